"""Dice / HD95 / MSD on shapes whose answers are worked out by hand, the empty-mask rule, summaries."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from aqcf.errors import AqcfError
from aqcf.evaluation.metrics import binary_metrics, evaluate_case, summarise


def _box(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return mask


def test_cubes_shifted_two_voxels_along_a_3mm_axis():
    # 3x3x3 cubes, the prediction shifted by 2 voxels along axis 0 (3 mm), 1 mm in-plane.
    # Every voxel but the centre is a surface voxel (26 per cube).  Prediction planes x=2,3,4:
    # x=2 (9 voxels) lies on the reference's face -> 0 mm; x=3 ring (8) -> 3 mm to plane 2;
    # x=4 (9) -> 6 mm.  Symmetric for reference -> prediction.
    # HD95: sorted directed distances 9x0, 8x3, 9x6; the 95th percentile (position 0.95*25 = 23.75)
    # falls among the 6s -> 6 mm.  MSD = (16*3 + 18*6) / 52 = 3 mm.  Dice = 2*9 / 54 = 1/3.
    ref = _box((9, 7, 7), (0 + 1, 2, 2), (3 + 1, 5, 5))
    pred = _box((9, 7, 7), (2 + 1, 2, 2), (5 + 1, 5, 5))
    result = binary_metrics(pred, ref, (3.0, 1.0, 1.0))
    assert result["dice"] == pytest.approx(1 / 3, abs=1e-6)
    assert result["hd95"] == pytest.approx(6.0, abs=1e-5)
    assert result["msd"] == pytest.approx(3.0, abs=1e-5)
    assert (result["pred_voxels"], result["ref_voxels"], result["intersection"]) == (27, 27, 9)


def test_spacing_follows_the_array_axes():
    # the same cubes with the 3 mm spacing on another axis: the shift axis is now 1 mm, so the
    # distances scale to 2 mm (HD95) and 1 mm (MSD)
    ref = _box((9, 7, 7), (1, 2, 2), (4, 5, 5))
    pred = _box((9, 7, 7), (3, 2, 2), (6, 5, 5))
    result = binary_metrics(pred, ref, (1.0, 1.0, 3.0))
    assert result["hd95"] == pytest.approx(2.0, abs=1e-5)
    assert result["msd"] == pytest.approx(1.0, abs=1e-5)


def test_slabs_half_overlapping():
    # two-voxel-thick slabs (every voxel on the surface), shifted by one 2.5 mm voxel: half of each
    # surface is shared (0 mm), half is one plane away (2.5 mm).  HD95 2.5, MSD 1.25, Dice 1/2.
    ref = _box((8, 10, 10), (2, 1, 1), (4, 9, 9))
    pred = _box((8, 10, 10), (3, 1, 1), (5, 9, 9))
    result = binary_metrics(pred, ref, (2.5, 0.7, 0.7))
    assert result["dice"] == pytest.approx(0.5, abs=1e-6)
    assert result["hd95"] == pytest.approx(2.5, abs=1e-5)
    assert result["msd"] == pytest.approx(1.25, abs=1e-5)


def _surface(mask):
    """Voxels of ``mask`` with a face-neighbour outside the mask (outside the array counts as outside)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1].copy()
    for axis, step in itertools.product(range(3), (-1, 1)):
        inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inner)


def test_boxes_against_a_brute_force_surface_distance():
    # boxes of different sizes offset along two axes, anisotropic spacing; the expectation is all
    # pairwise surface-voxel distances computed directly
    spacing = np.array([0.8, 1.3, 3.0])
    ref = _box((14, 14, 10), (2, 3, 2), (9, 10, 7))
    pred = _box((14, 14, 10), (4, 2, 3), (12, 8, 8))
    sp, sr = _surface(pred) * spacing, _surface(ref) * spacing
    pairwise = np.linalg.norm(sp[:, None, :] - sr[None, :, :], axis=-1)
    pred_to_ref, ref_to_pred = pairwise.min(axis=1), pairwise.min(axis=0)
    hd95 = max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))
    msd = np.concatenate([pred_to_ref, ref_to_pred]).mean()
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())

    result = binary_metrics(pred, ref, tuple(spacing))
    assert result["dice"] == pytest.approx(dice, abs=1e-6)
    assert result["hd95"] == pytest.approx(hd95, rel=1e-5)
    assert result["msd"] == pytest.approx(msd, rel=1e-5)


def test_prediction_equal_to_reference():
    ref = _box((10, 10, 6), (2, 2, 1), (7, 8, 5))
    result = binary_metrics(ref.copy(), ref, (0.7, 0.7, 2.0))
    assert result["dice"] == pytest.approx(1.0)
    assert result["hd95"] == 0.0
    assert result["msd"] == 0.0


def test_empty_rules():
    empty = np.zeros((6, 6, 4), dtype=bool)
    box = _box((6, 6, 4), (1, 1, 1), (3, 3, 3))
    both = binary_metrics(empty, empty, (1.0, 1.0, 2.0))
    assert (both["dice"], both["hd95"], both["msd"]) == (1.0, 0.0, 0.0)

    for pred, ref in ((box, empty), (empty, box)):
        one = binary_metrics(pred, ref, (1.0, 1.0, 2.0))
        assert one["dice"] == 0.0
        assert math.isnan(one["hd95"]) and math.isnan(one["msd"])

    diagonal = math.sqrt(6.0**2 + 6.0**2 + 8.0**2)
    one = binary_metrics(box, empty, (1.0, 1.0, 2.0), empty_distance="diagonal")
    assert one["hd95"] == pytest.approx(diagonal)
    assert one["msd"] == pytest.approx(diagonal)


def test_evaluate_case_liver_includes_tumor():
    ref = np.zeros((10, 10, 6), dtype=np.uint8)
    ref[2:8, 2:8, 1:5] = 1
    ref[3:5, 3:5, 2:4] = 2  # 8 tumor voxels inside a 144-voxel liver
    pred = ref.copy()
    pred[pred == 2] = 1  # tumor missed, but called liver
    rows = {r["class"]: r for r in evaluate_case(pred, ref, (1.0, 1.0, 1.0), case="c1", modality="ct")}
    assert rows["liver"]["dice"] == pytest.approx(1.0)
    assert rows["liver"]["ref_voxels"] == 144
    assert rows["tumor"]["dice"] == 0.0
    assert (rows["tumor"]["pred_voxels"], rows["tumor"]["ref_voxels"]) == (0, 8)
    assert rows["tumor"]["case"] == "c1" and rows["tumor"]["modality"] == "ct"


def test_evaluate_case_rejects_bad_input():
    ref = np.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.raises(AqcfError, match="shape"):
        evaluate_case(np.zeros((4, 4, 5), dtype=np.uint8), ref, (1, 1, 1))
    bad = ref.copy()
    bad[0, 0, 0] = 3
    with pytest.raises(AqcfError, match=r"case 'x' prediction: label values \{3\} outside \{0, 1, 2\}"):
        evaluate_case(bad, ref, (1, 1, 1), case="x")


def _row(case, cls, dice, hd95, msd, pred, ref, inter, modality="ct"):
    return {"case": case, "modality": modality, "class": cls, "dice": dice, "hd95": hd95, "msd": msd,
            "pred_voxels": pred, "ref_voxels": ref, "intersection": inter}


def test_summarise_means_pooled_dice_and_undefined_distances():
    rows = [
        _row("a", "tumor", 0.8, 4.0, 1.0, 100, 150, 100),
        _row("b", "tumor", 0.0, math.nan, math.nan, 10, 0, 0),  # tumor-free, false positive
        _row("c", "tumor", 1.0, 0.0, 0.0, 0, 0, 0),  # tumor-free, correct
        _row("a", "liver", 0.9, 5.0, 2.0, 1000, 1000, 900, modality="mri"),
    ]
    summary = summarise(rows)
    tumor = summary["per_modality"]["ct"]["tumor"]
    assert tumor["dice"]["mean"] == pytest.approx(0.6)
    assert tumor["dice"]["std"] == pytest.approx(np.std([0.8, 0.0, 1.0], ddof=1))
    assert tumor["dice"]["median"] == pytest.approx(0.8)
    assert tumor["dice"]["n"] == 3
    assert tumor["hd95"]["mean"] == pytest.approx(2.0)
    assert (tumor["hd95"]["n"], tumor["hd95"]["n_undefined"]) == (2, 1)
    assert tumor["pooled_dice"] == pytest.approx(2 * 100 / (110 + 150))
    assert tumor["n_ref_empty"] == 2
    assert summary["n_cases"] == {"ct": 3, "mri": 1}
    assert summary["per_modality"]["mri"]["liver"]["dice"]["std"] is None  # one case: SD undefined
