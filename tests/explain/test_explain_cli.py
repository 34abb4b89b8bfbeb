"""``aqcf explain`` end to end on the tiny run and its phantom cohorts."""

from __future__ import annotations

import csv
import json
import math
import os

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from aqcf.cli import main
from aqcf.explain import gates as gates_module
from aqcf.visualize import canvas
from aqcf.visualize.overlays import pick_slices
from tests.pictures import blue, colour_at, grey, keep_figures, near, panel, read_png, red, view_cell

DRAWN: dict = {}  # file name -> the figure `aqcf explain` saved there (the module's run)

FILES = ("saliency.csv", "summary.json", "summary.md", "saliency.png", "feature_maps.png",
         "gates.md", "gates.csv", "gates.png")


def _ckpt(run) -> str:
    return str(run / "checkpoints" / "best.ckpt")


def _fold0_val(phantoms, modality: str) -> list[str]:
    splits = json.loads((phantoms / "cache" / modality / "splits.json").read_text())
    return splits[0]["val"]


def _rows(out) -> list[dict]:
    with open(out / "saliency.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def explained(tiny_run, tiny_phantoms, tmp_path_factory):
    """``aqcf explain`` on the run's own held-out cases (fold 0 validation), two per modality."""
    out = tmp_path_factory.mktemp("explain") / "out"
    with pytest.MonkeyPatch.context() as patch:
        keep_figures(patch, canvas, DRAWN)
        keep_figures(patch, gates_module, DRAWN)
        code = main(["explain", "--ckpt", _ckpt(tiny_run), "--out", str(out), "--cases", "2", "--no-progress"])
    assert code == 0
    return out


def test_writes_every_result(explained):
    for name in FILES:
        assert (explained / name).is_file(), name
    for name in ("saliency.png", "feature_maps.png", "gates.png"):
        pixels = matplotlib.image.imread(explained / name)
        assert pixels.ndim == 3 and pixels[..., :3].std() > 0, name


def _window(volume, start, size):
    """``volume[start : start + size]`` per axis, zero where the window reaches outside (padding)."""
    out = np.zeros(size, volume.dtype)
    inside = tuple(slice(max(a, 0), min(a + n, d)) for a, n, d in zip(start, size, volume.shape, strict=True))
    at = tuple(slice(s.start - a, s.stop - a) for s, a in zip(inside, start, strict=True))
    out[at] = volume[inside]
    return out


def _check_case_figure(fig, pixels, out, phantoms, maps: int, features: bool) -> list[str]:
    """Each row's ground-truth panel shows that case's labels at their places (tumor blue, liver red,
    background grey) on the window's slice with the most tumor; the image panel is grey; the ``maps``
    map panels hold the colour map (the feature maps no label colour).

    Returns:
        The row names (``"MRI atlas-0"``, ...), top to bottom.
    """
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:2] == ["image", "ground truth"] and len(titles) == 2 + maps
    rows = np.asarray(fig.axes).reshape(-1, len(titles))
    windows = {(r["modality"], r["case"]): r for r in _rows(out)}
    cache = {m: next((phantoms / "cache").glob(f"{m}-*")) for m in ("ct", "mri")}
    names = [row[0].get_ylabel() for row in rows]
    for (image_ax, gt_ax, *map_axes), row_name in zip(rows, names, strict=True):
        modality, case = row_name.split()[0].lower(), row_name.split()[1]
        record = windows[(modality, case)]
        label_file = nib.load(cache[modality] / "labels" / f"{case}.nii")
        codes = "".join(nib.aff2axcodes(label_file.affine))  # the paper's RAS for CT, LAS for MRI
        label = _window(np.asarray(label_file.dataobj), [int(v) for v in record["window_start"].split()],
                        [int(v) for v in record["window_size"].split()])
        cells = label[:, :, pick_slices(label, 1)[0]]
        for x, y in np.ndindex(cells.shape):
            shown = colour_at(pixels, gt_ax, *view_cell(x, y, cells.shape, codes))
            assert blue(shown) == (cells[x, y] == 2) and red(shown) == (cells[x, y] == 1), (row_name, x, y)
            assert grey(shown) == (cells[x, y] == 0)
        assert grey(panel(pixels, image_ax)).all()
        for ax in map_axes:
            assert not grey(panel(pixels, ax)).all()
            if features:
                assert not blue(panel(pixels, ax)).any() and not red(panel(pixels, ax)).any()
    return names


@pytest.mark.parametrize("name", ["saliency.png", "feature_maps.png"])
def test_figures_show_each_case_in_its_row_and_panel(explained, tiny_phantoms, name):
    features = name == "feature_maps.png"
    names = _check_case_figure(DRAWN[name], read_png(explained / name), explained, tiny_phantoms,
                               maps=3 if features else 2, features=features)
    assert [n.split()[0] for n in names] == ["MRI", "MRI", "CT", "CT"]  # the paper's order
    tumor = {(r["modality"].upper(), r["case"]) for r in _rows(explained) if int(r["has_tumor"])}
    assert tuple(names[0].split()) in tumor  # cases with tumor first


def test_gate_plot_has_a_box_per_stage_and_direction(explained):
    ax = DRAWN["gates.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"Stage {s}" for s in (1, 2, 3, 4)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["MRI → CT (λ_mri→ct)", "CT → MRI (λ_ct→mri)"]
    with open(explained / "gates.csv", newline="") as handle:
        gates = list(csv.DictReader(handle))
    pixels = read_png(explained / "gates.png")
    faces = {"mri_to_ct": (-0.175, "#d95f02"), "ct_to_mri": (0.175, "#1b9e77")}
    for row in gates:
        offset, colour = faces[row["direction"]]
        q1, median, q3 = (float(row[k]) for k in ("q1", "median", "q3"))
        # the black median line at its stage and direction (the boxes of a barely trained net are flat)
        assert near(pixels, ax, int(row["stage"]) + offset, median, (0.0, 0.0, 0.0), radius=2, tol=0.35), row
        if q3 - median > 0.04:  # a box tall enough to hold pixels of its face between median and q3
            shown = colour_at(pixels, ax, int(row["stage"]) + offset, (median + q3) / 2)
            np.testing.assert_allclose(shown, 0.8 * np.asarray(to_rgb(colour)) + 0.2, atol=0.05)


def test_table_covers_the_held_out_cases(explained, tiny_phantoms):
    rows = _rows(explained)
    expected = {(m, case) for m in ("ct", "mri") for case in _fold0_val(tiny_phantoms, m)[:2]}
    assert {(r["modality"], r["case"]) for r in rows} == expected
    assert sorted(r["method"] for r in rows) == sorted(["gradcam", "gradcampp"] * len(expected))
    cache = {m: next((tiny_phantoms / "cache").glob(f"{m}-*")) for m in ("ct", "mri")}
    for row in rows:
        label = np.asarray(nib.load(cache[row["modality"]] / "labels" / f"{row['case']}.nii").dataobj)
        assert int(row["has_tumor"]) == int((label == 2).any())
        assert row["layer"] == f"decoders.{row['modality']}.stages.3"
        assert row["window_size"] == "32 32 16"
        values = [float(row[k]) for k in ("saliency_iou", "band_coverage", "pointing_game")]
        if int(row["has_tumor"]):
            assert all(0.0 <= v <= 1.0 for v in values)
            assert row["window_centred_on"] == "tumor"
        else:  # no localisation target
            assert all(math.isnan(v) for v in values)


def test_summary_is_the_mean_of_the_table(explained):
    rows = _rows(explained)
    summary = json.loads((explained / "summary.json").read_text())
    assert summary["cases"] == {"ct": 2, "mri": 2}
    for method in ("gradcam", "gradcampp"):
        for group in ("ct", "mri", "all"):
            scored = [float(r["saliency_iou"]) for r in rows
                      if r["method"] == method and group in ("all", r["modality"]) and int(r["has_tumor"])]
            stats = summary["saliency"][method][group]["saliency_iou"]
            assert stats["n"] == len(scored)
            if scored:
                assert stats["mean"] == pytest.approx(sum(scored) / len(scored))
    markdown = (explained / "summary.md").read_text()
    assert "Grad-CAM++" in markdown and "Saliency-IoU" in markdown


def test_gate_table_has_every_stage_and_direction(explained):
    with open(explained / "gates.csv", newline="") as handle:
        gates = list(csv.DictReader(handle))
    assert {(int(r["stage"]), r["direction"]) for r in gates} == {
        (s, d) for s in (1, 2, 3, 4) for d in ("mri_to_ct", "ct_to_mri")
    }
    for row in gates:
        assert int(row["n"]) == 2  # two pairs: two CT and two MRI cases
        assert 0.0 <= float(row["q1"]) <= float(row["median"]) <= float(row["q3"]) <= 1.0
    summary = json.loads((explained / "summary.json").read_text())
    assert summary["gates"]["pairs"] == 2


def test_refuses_to_overwrite(explained, tiny_run, capsys):
    before = {name: os.stat(explained / name).st_mtime_ns for name in FILES}
    code = main(["explain", "--ckpt", _ckpt(tiny_run), "--out", str(explained), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and str(explained) in err
    assert before == {name: os.stat(explained / name).st_mtime_ns for name in FILES}


def test_overwrite_with_one_cohort(tiny_run, tiny_phantoms, tmp_path, monkeypatch):
    drawn = {}
    keep_figures(monkeypatch, canvas, drawn)
    out = tmp_path / "out"
    out.mkdir()
    (out / "gates.md").write_text("from an earlier run\n")
    code = main([
        "explain", "--ckpt", _ckpt(tiny_run), "--out", str(out), "--overwrite", "--no-progress",
        "--data", str(tiny_phantoms / "ATLAS"), "--format", "atlas", "--modality", "mri",
        "--cases", "1", "--method", "gradcampp", "--layer", "bottleneck",
    ])
    assert code == 0
    rows = _rows(out)
    # the cohort's first case in natural order, explained at the requested layer with one method
    assert [(r["case"], r["method"], r["layer"]) for r in rows] == [("atlas-0", "gradcampp", "bottleneck")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gates"]["pairs"] == 0 and "both" in summary["gates"]["skipped"]
    assert not (out / "gates.md").exists()  # a stale result is not left beside the new ones
    assert matplotlib.image.imread(out / "saliency.png")[..., :3].std() > 0
    names = _check_case_figure(drawn["saliency.png"], read_png(out / "saliency.png"), out, tiny_phantoms,
                               maps=1, features=False)
    assert names == ["MRI atlas-0"]


def test_bad_layer_is_a_one_line_error(tiny_run, tmp_path, capsys):
    code = main(["explain", "--ckpt", _ckpt(tiny_run), "--out", str(tmp_path / "out"), "--layer", "decoder.9"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("aqcf: error:") and "'decoder.9'" in err
    for layer in ("decoders.ct.stages.3", "decoders.mri.stages.3", "bottleneck", "encoders.mri.0"):
        assert layer in err
    assert not (tmp_path / "out").exists()
