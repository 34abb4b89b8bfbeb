"""Saliency localisation metrics on synthetic maps with answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aqcf.errors import AqcfError
from aqcf.explain.metrics import (
    binarise_saliency,
    boundary_band,
    boundary_band_coverage,
    pointing_game,
    saliency_iou,
    saliency_metrics,
    summarise_saliency,
)

SHAPE = (20, 20, 12)
SPACING = (1.0, 1.0, 2.0)  # mm, anisotropic
# a box tumor of 8 x 8 x 4 voxels: x, y in 6..13, z in 4..7
BOX = ((6, 13), (6, 13), (4, 7))


def _box_mask():
    mask = np.zeros(SHAPE, dtype=bool)
    (x0, x1), (y0, y1), (z0, z1) = BOX
    mask[x0 : x1 + 1, y0 : y1 + 1, z0 : z1 + 1] = True
    return mask


def _outside_band_by_hand(band_mm):
    """Non-tumor voxels whose centre lies within band_mm of the nearest tumor voxel centre."""
    band = np.zeros(SHAPE, dtype=bool)
    for index in np.ndindex(*SHAPE):
        gaps = [max(lo - i, 0, i - hi) for i, (lo, hi) in zip(index, BOX, strict=True)]
        if any(gaps):
            band[index] = math.dist([0, 0, 0], [g * s for g, s in zip(gaps, SPACING, strict=True)]) <= band_mm
    return band


def test_map_equal_to_mask_is_perfect():
    mask = _box_mask()
    saliency = mask.astype(float)
    for rule in ("topk", "fraction", "quantile"):
        assert saliency_iou(saliency, mask, rule=rule) == 1.0
    assert pointing_game(saliency, mask) is True


def test_iou_topk_known_value():
    mask = np.zeros(SHAPE, dtype=bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    saliency = np.zeros(SHAPE)
    saliency[0:2, 0:2, 0] = 2.0  # 4 tumor voxels
    saliency[10:12, 10:12, 5] = 3.0  # 4 voxels outside, more salient
    saliency[0:2, 0:2, 1] = 0.5  # the other 4 tumor voxels, below the top 8
    # top 8 = 4 in + 4 out: IoU = 4 / (8 + 4) = 1/3
    assert saliency_iou(saliency, mask) == pytest.approx(1 / 3)


def test_iou_fraction_rule():
    mask = _box_mask()  # 256 voxels
    saliency = mask * 1.0
    saliency[0:4, 0:4, 0:2] = 0.6  # 32 voxels away from the tumor
    assert saliency_iou(saliency, mask, rule="fraction", threshold=0.5) == pytest.approx(256 / 288)
    assert saliency_iou(saliency, mask, rule="fraction", threshold=0.7) == 1.0


def test_binarise_all_zero_map_has_no_salient_voxel():
    assert not binarise_saliency(np.zeros(SHAPE), "topk", k=5).any()


def test_pointing_game_peak_outside_and_tolerance():
    mask = _box_mask()
    saliency = mask * 0.5
    saliency[10, 10, 9] = 1.0  # two slices above the box (z = 7): 2 x 2 mm = 4 mm away
    assert pointing_game(saliency, mask) is False
    assert pointing_game(saliency, mask, SPACING, tolerance_mm=3.5) is False
    assert pointing_game(saliency, mask, SPACING, tolerance_mm=4.0) is True
    assert pointing_game(np.zeros(SHAPE), mask) is False


def test_boundary_band_on_anisotropic_box():
    mask = _box_mask()
    band = boundary_band(mask, SPACING, band_mm=3.0)
    # inside: a voxel is deeper than 3 mm only if it is >= 4 voxels from both x faces and both y
    # faces (x, y in 9..10) and >= 2 slices (4 mm) from both z faces (z in 5..6): 2 x 2 x 2 = 8 voxels
    core = np.zeros(SHAPE, dtype=bool)
    core[9:11, 9:11, 5:7] = True
    assert (band & mask).sum() == 256 - 8
    assert not (band & core).any()
    assert np.array_equal(band & ~mask, _outside_band_by_hand(3.0))


def test_band_coverage_mass_and_coverage_modes():
    mask = _box_mask()
    band = mask.copy()
    band[9:11, 9:11, 5:7] = False
    band |= _outside_band_by_hand(3.0)
    n_band = int(band.sum())

    assert boundary_band_coverage(np.ones(SHAPE), mask, SPACING) == pytest.approx(n_band / np.prod(SHAPE))
    core_only = np.zeros(SHAPE)
    core_only[9:11, 9:11, 5:7] = 1.0
    assert boundary_band_coverage(core_only, mask, SPACING) == 0.0
    half = core_only.copy()
    half[6:14, 6, 4] = 1.0  # 8 voxels on the box's edge, in the band
    assert boundary_band_coverage(half, mask, SPACING) == pytest.approx(0.5)

    # coverage: the map marks the tumor's inner band (248 voxels); the band also has its outer part
    inner = (mask & ~core_only.astype(bool)).astype(float)
    covered = boundary_band_coverage(inner, mask, SPACING, mode="coverage", rule="fraction")
    assert covered == pytest.approx(248 / n_band)


def test_bad_inputs():
    mask = _box_mask()
    with pytest.raises(AqcfError):
        saliency_iou(np.ones(SHAPE), np.zeros(SHAPE, dtype=bool))
    with pytest.raises(AqcfError):
        saliency_iou(-np.ones(SHAPE), mask)
    with pytest.raises(AqcfError):
        saliency_iou(np.ones((4, 4, 4)), mask)
    with pytest.raises(AqcfError):
        boundary_band_coverage(np.ones(SHAPE), mask, (1.0, 1.0))


def test_saliency_metrics_without_tumor_is_nan():
    values = saliency_metrics(np.ones(SHAPE), np.zeros(SHAPE, dtype=bool), SPACING)
    assert all(math.isnan(v) for v in values.values())
    values = saliency_metrics(_box_mask() * 1.0, _box_mask(), SPACING)
    assert values["saliency_iou"] == 1.0 and values["pointing_game"] == 1.0


def test_summarise_per_modality_and_folds():
    nan = math.nan
    rows = [
        {"modality": "ct", "fold": 0, "saliency_iou": 0.6, "band_coverage": 0.7, "pointing_game": True},
        {"modality": "ct", "fold": 1, "saliency_iou": 0.8, "band_coverage": 0.9, "pointing_game": False},
        {"modality": "ct", "fold": 1, "saliency_iou": nan, "band_coverage": nan, "pointing_game": nan},
        {"modality": "mri", "fold": 0, "saliency_iou": 0.5, "band_coverage": 0.4, "pointing_game": True},
    ]
    summary = summarise_saliency(rows)
    assert summary["ct"]["saliency_iou"]["mean"] == pytest.approx(0.7)
    assert summary["ct"]["saliency_iou"]["sd"] == pytest.approx(math.sqrt(0.02))  # (0.1² + 0.1²) / (2 - 1)
    assert summary["ct"]["saliency_iou"]["n"] == 2
    assert summary["ct"]["pointing_game"]["mean"] == pytest.approx(0.5)
    assert summary["mri"]["band_coverage"]["n"] == 1 and math.isnan(summary["mri"]["band_coverage"]["sd"])
    assert summary["all"]["saliency_iou"]["mean"] == pytest.approx((0.6 + 0.8 + 0.5) / 3)

    # per fold first: fold 0 = mean(1, 1) = 1, fold 1 = 0; mean 0.5, SD sqrt(0.5)
    by_fold = summarise_saliency(rows, across="folds")
    assert by_fold["all"]["pointing_game"]["mean"] == pytest.approx(0.5)
    assert by_fold["all"]["pointing_game"]["sd"] == pytest.approx(math.sqrt(0.5))
    with pytest.raises(AqcfError):
        summarise_saliency([{"modality": "ct", "saliency_iou": 1.0}])
