"""Pictures: overlay colours, radiological orientation, slice choice, PNG output, map grids, charts."""

from __future__ import annotations

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from aqcf.errors import AqcfError
from aqcf.visualize.canvas import figure_to_rgb
from aqcf.visualize.charts import BOX_COLOURS, bar_chart, box_chart, run_colors
from aqcf.visualize.maps import plot_feature_maps, plot_saliency
from aqcf.visualize.overlays import overlay, overlay_grid, pick_slices, save_overlay_png
from tests.pictures import blue, colour_at, grey, panel, ras_cell, read_png, red, rendered


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
    gt[8:12, 9:13, 3:5] = 2
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
    _check_case_colours(rendered(fig), panels, [2, 3, 4])
    with pytest.raises(AqcfError):
        overlay_grid(image, {"gt": gt[:, :, :4]}, [1])
    with pytest.raises(AqcfError):
        overlay_grid(image, {"gt": gt}, [8])


def _check_case_colours(rgb, panels, slices):
    """Colours of :func:`_case`'s overlays at known voxels, panels (ground truth, prediction) per slice.

    The tumor is x 8..11, y 9..12 on z 3..4 in the ground truth, one voxel further in x in the
    prediction; the liver x 4..17 (5..18), y 4..15 on z 1..6. RAS: voxel (x, y) is drawn at column
    X - 1 - x, row Y - 1 - y (the voxels checked have no tumor at their mirror images).
    """
    shape = (24, 20)
    for row, z in enumerate(slices):
        gt_ax, pred_ax = panels[2 * row], panels[2 * row + 1]
        assert grey(colour_at(rgb, gt_ax, *ras_cell(1, 1, shape)))  # background
        if z in (3, 4):
            # x = 8: tumor in the ground truth, liver in the prediction; x = 12 the other way round
            assert blue(colour_at(rgb, gt_ax, *ras_cell(8, 12, shape)))
            assert red(colour_at(rgb, pred_ax, *ras_cell(8, 12, shape)))
            assert red(colour_at(rgb, gt_ax, *ras_cell(12, 12, shape)))
            assert blue(colour_at(rgb, pred_ax, *ras_cell(12, 12, shape)))
        else:  # no tumor on this slice: no blue anywhere in its panels, the liver red
            for ax in (gt_ax, pred_ax):
                assert not blue(panel(rgb, ax)).any()
                assert red(colour_at(rgb, ax, *ras_cell(10, 10, shape)))


def test_save_overlay_png(tmp_path):
    image, gt, pred = _case()
    columns = {"ground truth": gt, "prediction": pred}
    out = save_overlay_png(tmp_path / "sub" / "val.png", image, columns, title="x")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same figure drawn again tells which pixel of the PNG shows which voxel
    slices = pick_slices(gt, 3)
    assert {3, 4} & set(slices) and set(slices) - {3, 4}  # rows with and without tumor
    fig = overlay_grid(image, columns, slices, title="x")
    rendered(fig)
    _check_case_colours(read_png(out), [ax for ax in fig.axes if ax.images], slices)
    pixels = mpimg.imread(out)[..., :3]
    red = pixels[..., 0] - pixels[..., 1:].max(axis=-1)
    blue = pixels[..., 2] - pixels[..., :2].max(axis=-1)
    assert (red > 0.3).any() and (blue > 0.3).any()
    assert [p.name for p in out.parent.iterdir()] == ["val.png"]  # no temporary file left behind


def _map_row():
    """One case on an RAS (X = 20, Y = 16) slice: liver x 2..15, y 2..13, tumor x 4..7, y 5..8; a map
    of 0.8 on x 12..15, y 10..13 (inside the liver, away from the tumor) and 0 elsewhere."""
    label = np.zeros((20, 16), dtype=int)
    label[2:16, 2:14] = 1
    label[4:8, 5:9] = 2
    heat = np.zeros((20, 16))
    heat[12:16, 10:14] = 0.8
    return {"name": "CT case", "image": np.full((20, 16), 0.5), "label": label, "maps": {"map": heat},
            "orientation": "RAS", "spacing": (1.0, 1.0, 2.0)}


def _check_image_and_ground_truth(rgb, image_ax, gt_ax):
    shape = (20, 16)
    assert grey(panel(rgb, image_ax)).all()  # the image column is grey only
    assert blue(colour_at(rgb, gt_ax, *ras_cell(5, 6, shape)))  # tumor
    assert red(colour_at(rgb, gt_ax, *ras_cell(13, 11, shape)))  # liver
    assert grey(colour_at(rgb, gt_ax, *ras_cell(18, 15, shape)))  # background
    # small x is toward the patient's left: the tumor is in the viewer's right half of the panel
    gt = panel(rgb, gt_ax)
    tumor_columns = np.flatnonzero(blue(gt).any(axis=0))
    assert tumor_columns.size and tumor_columns.min() > gt.shape[1] / 2


def test_saliency_grid_puts_each_colour_in_its_panel():
    fig = plot_saliency([_map_row()], title="t")
    rgb = rendered(fig)
    image_ax, gt_ax, heat_ax = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["image", "ground truth", "map"]
    _check_image_and_ground_truth(rgb, image_ax, gt_ax)
    # the heat map is jet at opacity 0.45 over the grey 0.5
    jet = matplotlib.colormaps["jet"]
    hot, cold = (0.55 * 0.5 + 0.45 * np.asarray(jet(v)[:3]) for v in (0.8, 0.0))
    np.testing.assert_allclose(colour_at(rgb, heat_ax, *ras_cell(13, 11, (20, 16))), hot, atol=0.02)
    np.testing.assert_allclose(colour_at(rgb, heat_ax, *ras_cell(18, 2, (20, 16))), cold, atol=0.02)
    assert not blue(panel(rgb, image_ax)).any() and not red(panel(rgb, image_ax)).any()


def test_feature_grid_puts_each_colour_in_its_panel():
    fig = plot_feature_maps([_map_row()])
    rgb = rendered(fig)
    image_ax, gt_ax, feature_ax = fig.axes
    _check_image_and_ground_truth(rgb, image_ax, gt_ax)
    viridis = matplotlib.colormaps["viridis"]
    np.testing.assert_allclose(colour_at(rgb, feature_ax, *ras_cell(13, 11, (20, 16))), viridis(0.8)[:3], atol=0.02)
    np.testing.assert_allclose(colour_at(rgb, feature_ax, *ras_cell(5, 6, (20, 16))), viridis(0.0)[:3], atol=0.02)
    # no label colour in the feature panel: the tumor is not drawn there
    assert not blue(panel(rgb, feature_ax)).any() and not red(panel(rgb, feature_ax)).any()


def test_map_grid_without_cases():
    with pytest.raises(AqcfError, match="saliency figure"):
        plot_saliency([])


def test_bar_chart_bars_stand_where_their_groups_are():
    fig = bar_chart(["CT liver", "CT tumor"], {"a": ([80.0, 40.0], [0.0, 0.0]), "b": ([60.0, 20.0], [0.0, 0.0])},
                    ylabel="Dice (%)", ylim=(0, 100))
    rgb = rendered(fig)
    ax = fig.axes[0]
    first, second = run_colors(2)
    # two series: bars 0.4 wide, centred 0.2 left and right of each group
    np.testing.assert_allclose(colour_at(rgb, ax, -0.2, 70.0), first, atol=0.02)
    np.testing.assert_allclose(colour_at(rgb, ax, 0.2, 50.0), second, atol=0.02)
    np.testing.assert_allclose(colour_at(rgb, ax, 0.8, 30.0), first, atol=0.02)
    np.testing.assert_allclose(colour_at(rgb, ax, 1.2, 10.0), second, atol=0.02)
    for x, y in ((0.2, 70.0), (0.8, 50.0), (1.2, 30.0)):  # above each bar: the white background
        np.testing.assert_allclose(colour_at(rgb, ax, x, y), 1.0, atol=0.02)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["CT liver", "CT tumor"]
    assert ax.get_ylim() == (0, 100)


@pytest.mark.parametrize("summarised", [False, True])
def test_box_chart_boxes_stand_where_their_groups_are(summarised):
    samples = {"A": {1: [0.1, 0.2, 0.3, 0.4, 0.5]}, "B": {1: [0.6, 0.7, 0.8], 2: [0.2, 0.3, 0.4]}}
    series = samples
    if summarised:
        series = {name: {g: np.quantile(v, [0.25, 0.5, 0.75]) for g, v in by.items()} for name, by in samples.items()}
    fig = box_chart(series, {1: "Stage 1", 2: "Stage 2"}, summarised=summarised, ylim=(0.0, 1.0))
    rgb = rendered(fig)
    ax = fig.axes[0]
    # two series: boxes at 0.175 left and right of each group, facecolour at opacity 0.8 over white
    face = [0.8 * np.asarray(to_rgb(c)) + 0.2 for c in BOX_COLOURS[:2]]
    np.testing.assert_allclose(colour_at(rgb, ax, 0.825, 0.25), face[0], atol=0.03)  # A: IQR 0.2..0.4
    np.testing.assert_allclose(colour_at(rgb, ax, 1.175, 0.68), face[1], atol=0.03)  # B: 0.65..0.75
    np.testing.assert_allclose(colour_at(rgb, ax, 2.175, 0.28), face[1], atol=0.03)  # B: 0.25..0.35
    np.testing.assert_allclose(colour_at(rgb, ax, 1.175, 0.25), 1.0, atol=0.02)  # below B's box
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Stage 1", "Stage 2"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B"]
