"""Figure commands: training curves from CSVLogger files and qualitative overlays from NIfTI files."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from aqcf.cli import main as aqcf_main
from aqcf.visualize import curves as curves_module
from aqcf.visualize import figures as figures_module
from aqcf.visualize.curves import aggregate_runs, read_metrics_csv
from tests.pictures import blue, colour_at, grey, keep_figures, near, ras_cell, read_png, red

HEADER = ["epoch", "step", "train/loss", "train/dice_mean", "val/loss", "val/dice_mean", "val/dice_ct_tumor"]


def _write_run(folder, epochs, offset=0.0):
    """A Lightning CSVLogger file: train and val metrics on separate, sparse rows."""
    path = folder / "lightning_logs" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    lines = [",".join(HEADER)]
    step = 0
    for e in range(epochs):
        step += 10
        loss, dice = 1.0 / (e + 1) + offset, 0.5 + 0.1 * e + offset
        lines.append(f"{e},{step},{loss},{dice},,,")
        lines.append(f"{e},{step},,,{loss + 0.1},{dice - 0.05},{dice - 0.2}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_metrics_csv_sparse_rows_and_step_means(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss_step,train/loss_epoch,val/loss\n"
        "0,0,0.9,,\n0,1,0.7,,\n0,1,,0.8,\n0,1,,,0.85\n1,2,0.5,,\n1,3,,0.4,\n1,3,,,\n"
    )
    values = read_metrics_csv(path, ["train/loss", "val/loss", "train/dice_mean"])
    assert values["train/loss"] == pytest.approx({0: 0.8, 1: 0.4})  # the _epoch column
    assert values["val/loss"] == pytest.approx({0: 0.85})
    assert "train/dice_mean" not in values

    per_step = tmp_path / "steps.csv"
    per_step.write_text("epoch,step,train/loss\n0,0,0.8\n0,1,1.2\n1,2,0.5\n")
    assert read_metrics_csv(per_step, ["train/loss"])["train/loss"] == pytest.approx({0: 1.0, 1: 0.5})


def test_aggregate_runs_mean_and_bands():
    runs = [{0: 1.0, 1: 2.0, 2: 5.0}, {0: 3.0, 1: 2.0}]
    epochs, mean, low, high = aggregate_runs(runs, "sd")
    assert epochs.tolist() == [0, 1, 2]
    assert mean.tolist() == pytest.approx([2.0, 2.0, 5.0])
    assert low[0] == pytest.approx(2.0 - math.sqrt(2.0)) and high[0] == pytest.approx(2.0 + math.sqrt(2.0))
    assert math.isnan(low[2])  # one run only at epoch 2
    _, _, low, high = aggregate_runs(runs, "minmax")
    assert (low[0], high[0]) == (1.0, 3.0)


def test_curves_command_writes_png(tmp_path, monkeypatch):
    _write_run(tmp_path / "fold0", 4)
    _write_run(tmp_path / "fold1", 3, offset=0.05)
    drawn = {}
    keep_figures(monkeypatch, curves_module, drawn)
    out = tmp_path / "fig4.png"
    assert (
        aqcf_main(["figures", "curves", str(tmp_path / "fold0"), str(tmp_path / "fold1"), "--out", str(out)])
        == 0
    )
    # the mean of the two runs lies on the line of its metric, in its panel: training solid in the first
    # colour, validation dashed in the second; epoch 3 has fold 0 only
    train, val = to_rgb("C0"), to_rgb("C1")
    pixels = read_png(out)
    loss, dice = drawn["fig4.png"].axes
    assert near(pixels, loss, 1, (0.5 + 0.55) / 2, train) and near(pixels, loss, 3, 0.25, train)
    assert near(pixels, loss, 1, (0.6 + 0.65) / 2, val, radius=4)
    assert near(pixels, dice, 2, (0.7 + 0.75) / 2, train) and near(pixels, dice, 2, (0.65 + 0.7) / 2, val, radius=4)
    assert not near(pixels, loss, 2, (0.7 + 0.75) / 2, train)  # the Dice curve is not in the loss panel
    out2 = tmp_path / "fig4b.png"
    assert (
        aqcf_main(["figures", "curves", str(tmp_path), "--out", str(out2), "--band", "minmax", "--per-class"])
        == 0
    )
    per_class = drawn["fig4b.png"].axes[2]
    assert [line.get_label() for line in per_class.lines] == ["val/dice_ct_tumor (n=2)"]
    assert near(read_png(out2), per_class, 1, (0.4 + 0.45) / 2, train, radius=4)


def test_curves_without_metrics_names_the_folder(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    assert (
        aqcf_main(["figures", "curves", str(tmp_path / "empty_run"), "--out", str(tmp_path / "x.png")]) == 2
    )
    err = capsys.readouterr().err
    assert "empty_run" in err and "metrics.csv" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _case(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    rng = np.random.default_rng(0)
    image = rng.normal(60.0, 12.0, (32, 32, 8)).astype(np.float32)
    gt = np.zeros((32, 32, 8), dtype=np.uint8)
    gt[6:26, 8:24, 1:7] = 1
    gt[12:18, 12:18, 3:5] = 2
    pred = np.roll(gt, 2, axis=1)
    return (
        _save(tmp_path / "img.nii.gz", image, affine),
        _save(tmp_path / "gt.nii.gz", gt, affine),
        _save(tmp_path / "pred.nii.gz", pred, affine),
        _save(tmp_path / "small.nii.gz", pred[:, :, :6], affine),
    )


def test_qualitative_command_writes_png(tmp_path, monkeypatch):
    image, gt, pred, _ = _case(tmp_path)
    drawn = {}
    keep_figures(monkeypatch, figures_module, drawn)
    out = tmp_path / "fig5.png"
    argv = [
        "figures",
        "qualitative",
        "--image",
        image,
        "--gt",
        gt,
        "--pred",
        f"A-QCF-Net={pred}",
        "--pred",
        pred,
    ]
    assert aqcf_main([*argv, "--out", str(out), "--slices", "2"]) == 0
    pixels = mpimg.imread(out)[..., :3]
    assert (pixels[..., 0] - pixels[..., 1:].max(axis=-1) > 0.3).any()  # liver red
    assert (pixels[..., 2] - pixels[..., :2].max(axis=-1) > 0.3).any()  # tumor blue
    _check_qualitative_colours(read_png(out), drawn["fig5.png"])


def _check_qualitative_colours(pixels, fig):
    """Both rows (z = 3, 4) of :func:`_case`'s figure: the ground truth's tumor (x 12..17, y 12..17) and
    the predictions' (y 14..19) blue, their livers red, at the voxels' places in radiological view."""
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels[:3]] == ["ground truth", "A-QCF-Net", "pred"]
    assert [ax.get_ylabel() for ax in panels[::3]] == ["z = 3", "z = 4"]
    shape = (32, 32)
    for ax in panels:
        truth = ax in panels[::3]
        # voxel (12, 12): tumor in the ground truth, liver in the predictions; (12, 19) the other way
        assert blue(colour_at(pixels, ax, *ras_cell(12, 12, shape))) == truth
        assert red(colour_at(pixels, ax, *ras_cell(12, 12, shape))) != truth
        assert red(colour_at(pixels, ax, *ras_cell(12, 19, shape))) == truth
        assert blue(colour_at(pixels, ax, *ras_cell(12, 19, shape))) != truth
        assert grey(colour_at(pixels, ax, *ras_cell(2, 2, shape)))


def test_qualitative_shape_mismatch_names_the_file(tmp_path, capsys):
    image, gt, _, small = _case(tmp_path)
    argv = ["figures", "qualitative", "--image", image, "--gt", gt, "--pred", f"x={small}"]
    assert aqcf_main([*argv, "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "small.nii.gz" in err and "shape" in err and len(err.splitlines()) == 1
