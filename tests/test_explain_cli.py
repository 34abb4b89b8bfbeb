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

from aqcf.cli import main

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
    code = main(["explain", "--ckpt", _ckpt(tiny_run), "--out", str(out), "--cases", "2", "--no-progress"])
    assert code == 0
    return out


def test_writes_every_result(explained):
    for name in FILES:
        assert (explained / name).is_file(), name
    for name in ("saliency.png", "feature_maps.png", "gates.png"):
        pixels = matplotlib.image.imread(explained / name)
        assert pixels.ndim == 3 and pixels[..., :3].std() > 0, name


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


def test_overwrite_with_one_cohort(tiny_run, tiny_phantoms, tmp_path):
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


def test_bad_layer_is_a_one_line_error(tiny_run, tmp_path, capsys):
    code = main(["explain", "--ckpt", _ckpt(tiny_run), "--out", str(tmp_path / "out"), "--layer", "decoder.9"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("aqcf: error:") and "'decoder.9'" in err
    for layer in ("decoders.ct.stages.3", "decoders.mri.stages.3", "bottleneck", "encoders.mri.0"):
        assert layer in err
    assert not (tmp_path / "out").exists()
