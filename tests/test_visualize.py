"""Overlays: colours, radiological orientation, slice choice, PNG output."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from aqcf.errors import AqcfError
from aqcf.visualize import figure_to_rgb, overlay, overlay_grid, pick_slices, save_overlay_png


def _not_blank(png):
    pixels = mpimg.imread(png)[..., :3]
    return pixels.std() > 0 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1


def test_overlay_shape_and_colours():
    image = np.full((6, 4), 25.0)  # X = 6, Y = 4
    label = np.zeros((6, 4), dtype=int)
    label[1, 1] = 1
    label[4, 2] = 2
    out = overlay(image, label, alpha=0.4, window=(0.0, 100.0), orientation="LPS")
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    # grey 0.25; liver = 0.6 * 0.25 + 0.4 * (1, 0, 0); tumor = 0.6 * 0.25 + 0.4 * (0, 0, 1); x 255
    # LPS: no flip, so display row = y, column = x
    assert out[1, 1].tolist() == [140, 38, 38]
    assert out[2, 4].tolist() == [38, 38, 140]
    assert out[0, 0].tolist() == [64, 64, 64]


def test_overlay_radiological_view():
    label = np.zeros((5, 3), dtype=int)
    # RAS: x grows toward the patient's right, y toward anterior; the most right and anterior voxel
    # belongs at the top left corner (patient's right on the viewer's left, anterior up)
    label[4, 2] = 2
    out = overlay(np.ones((5, 3)), label, orientation="RAS")
    assert out[0, 0, 2] > out[0, 0, 0]
    assert (out[1:, :, 0] == out[1:, :, 2]).all() and (out[0, 1:, 0] == out[0, 1:, 2]).all()
    # LAS: x grows toward the patient's left, so the right-most voxel is x = 0
    label = np.zeros((5, 3), dtype=int)
    label[0, 2] = 2
    out = overlay(np.ones((5, 3)), label, orientation="LAS")
    assert out[0, 0, 2] > out[0, 0, 0]


def test_overlay_robust_window_ignores_one_outlier():
    image = np.tile(np.linspace(0.0, 100.0, 20)[:, None], (1, 20))
    image[0, 0] = 1e6
    out = overlay(image, np.zeros_like(image, dtype=int), orientation="LPS")
    # with a plain min/max, every tissue pixel would be black; the middle of the ramp stays mid-grey
    assert 90 < out[10, 10, 0] < 165
    assert out.min() == 0 and out.max() == 255


def test_overlay_rejects_mismatched_shapes():
    with pytest.raises(AqcfError):
        overlay(np.zeros((4, 4)), np.zeros((4, 5), dtype=int))


def test_pick_slices_prefers_tumor_and_spreads_out():
    label = np.zeros((12, 12, 30), dtype=int)
    label[:, :, 3:26] = 1
    # square tumors of side 1, 2, 3, 2, 1 (areas 1, 4, 9, 4, 1) on slices 10..14
    for z, side in zip(range(10, 15), (1, 2, 3, 2, 1), strict=True):
        label[5 : 5 + side, 5 : 5 + side, z] = 2
    # 12 first; 11 and 13 are too close (min gap ceil(5 / 3) = 2); then 14 and 10
    assert pick_slices(label, 3) == [10, 12, 14]


def test_pick_slices_without_tumor_uses_foreground():
    label = np.zeros((8, 8, 20), dtype=int)
    for z, r in zip(range(5, 10), (1, 2, 3, 2, 1), strict=True):
        label[:r, :r, z] = 1
    chosen = pick_slices(label, 3)
    assert 7 in chosen and all(5 <= z <= 9 for z in chosen) and len(set(chosen)) == 3


def test_pick_slices_empty_falls_back_to_middle():
    chosen = pick_slices(np.zeros((4, 4, 16), dtype=int), 3)
    assert chosen == sorted(chosen) and len(set(chosen)) == 3
    assert any(abs(z - 7.5) <= 1 for z in chosen)
    assert min(np.diff(chosen)) >= 16 // 4
    assert pick_slices(np.zeros((4, 4, 2), dtype=int), 5) == [0, 1]


def _case():
    image = np.random.default_rng(0).normal(50.0, 10.0, (24, 20, 8))
    gt = np.zeros(image.shape, dtype=int)
    gt[4:18, 4:16, 1:7] = 1
    gt[8:12, 8:12, 3:5] = 2
    pred = np.roll(gt, 1, axis=0)
    return image, gt, pred


def test_overlay_grid_layout():
    image, gt, pred = _case()
    fig = overlay_grid(image, {"ground truth": gt, "prediction": pred}, [2, 3, 4])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6
    assert [ax.get_title() for ax in panels[:2]] == ["ground truth", "prediction"]
    rgb = figure_to_rgb(fig)
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
    with pytest.raises(AqcfError):
        overlay_grid(image, {"gt": gt[:, :, :4]}, [1])
    with pytest.raises(AqcfError):
        overlay_grid(image, {"gt": gt}, [8])


def test_save_overlay_png(tmp_path):
    image, gt, pred = _case()
    out = save_overlay_png(
        tmp_path / "sub" / "val.png", image, {"ground truth": gt, "prediction": pred}, title="x"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _not_blank(out)
    pixels = mpimg.imread(out)[..., :3]
    red = pixels[..., 0] - pixels[..., 1:].max(axis=-1)
    blue = pixels[..., 2] - pixels[..., :2].max(axis=-1)
    assert (red > 0.3).any() and (blue > 0.3).any()
    assert [p.name for p in out.parent.iterdir()] == ["val.png"]  # no temporary file left behind
