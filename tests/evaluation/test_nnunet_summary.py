"""``summary.json`` also in nnU-Net v2's structure: per-case counts and Dice by region, means, foreground mean."""

from __future__ import annotations

import ast
import csv
import json

import nibabel as nib
import numpy as np
import pytest

from aqcf.cli import main as aqcf_main

SHAPE = (12, 10, 8)
# nnU-Net's region keys (str of a label or of a tuple of labels) for aqcf's classes
REGIONS = {"liver": ((1, 2), "(1, 2)"), "tumor": ((2,), "2")}


def _masks():
    """Reference and prediction per case: tumor found, tumor missed, tumor-free both empty, a false tumor."""
    rng = np.random.default_rng(0)
    cases = {}
    for name, tumor_in_ref, tumor_in_pred in [("a", True, True), ("b", True, False),
                                               ("c", False, False), ("d", False, True)]:
        ref = np.zeros(SHAPE, np.uint8)
        ref[2:10, 2:8, 1:7] = 1
        pred = ref.copy()
        pred[rng.random(SHAPE) < 0.1] = 0  # liver mostly found
        if tumor_in_ref:
            ref[4:7, 3:6, 2:5] = 2
        if tumor_in_pred:
            pred[5:8, 3:6, 2:5] = 2
        cases[name] = pred, ref
    return cases


@pytest.fixture
def evaluated(tmp_path):
    cases = _masks()
    for name, (pred, ref) in cases.items():
        for folder, label in (("pred", pred), ("ref", ref)):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(label, np.diag([1.5, 1.5, 3.0, 1.0])), str(tmp_path / folder / f"{name}.nii.gz"))
    assert aqcf_main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                      "--out", str(tmp_path / "out"), "--modality", "ct", "--no-progress"]) == 0
    return cases, tmp_path


def _counts(pred, ref, labels):
    p, r = np.isin(pred, labels), np.isin(ref, labels)
    return int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum()), int((~p & ~r).sum())


def test_nnunet_values_equal_the_projects_table_and_the_masks(evaluated):
    cases, root = evaluated
    summary = json.loads((root / "out" / "summary.json").read_text())
    with open(root / "out" / "metrics.csv", newline="") as handle:
        table = {(r["case"], r["class"]): float(r["dice"]) for r in csv.DictReader(handle)}
    entries = {e["case"]: e for e in summary["metric_per_case"]}
    assert sorted(entries) == sorted(cases)
    for name, (pred, ref) in cases.items():
        entry = entries[name]
        assert entry["prediction_file"] == str(root / "pred" / f"{name}.nii.gz")
        assert entry["reference_file"] == str(root / "ref" / f"{name}.nii.gz")
        assert set(entry["metrics"]) == {key for _, key in REGIONS.values()}
        for cls, (labels, key) in REGIONS.items():
            metrics = entry["metrics"][key]
            tp, fp, fn, tn = _counts(pred, ref, labels)
            assert (metrics["TP"], metrics["FP"], metrics["FN"], metrics["TN"]) == (tp, fp, fn, tn)
            assert (metrics["n_pred"], metrics["n_ref"]) == (tp + fp, tp + fn)
            if tp + fp + fn == 0:
                # both empty: nnU-Net's NaN (null here), where aqcf's own table scores 1
                assert metrics["Dice"] is None and metrics["IoU"] is None
                assert table[name, cls] == 1.0
            else:
                dice = 2 * tp / (2 * tp + fp + fn)
                assert metrics["Dice"] == pytest.approx(dice, abs=1e-12)
                # aqcf's Dice comes from MONAI in float32
                assert metrics["Dice"] == pytest.approx(table[name, cls], abs=1e-6)
                assert metrics["IoU"] == pytest.approx(tp / (tp + fp + fn), abs=1e-12)


def test_nnunet_means_leave_out_the_undefined_case(evaluated):
    cases, root = evaluated
    summary = json.loads((root / "out" / "summary.json").read_text())
    dice = {}
    for labels, key in REGIONS.values():
        values = []
        for pred, ref in cases.values():
            tp, fp, fn, _ = _counts(pred, ref, labels)
            if tp + fp + fn:
                values.append(2 * tp / (2 * tp + fp + fn))
        dice[key] = np.mean(values)
        assert summary["mean"][key]["Dice"] == pytest.approx(dice[key], abs=1e-12)
    # tumor: case c (both empty) is left out of nnU-Net's mean but scores 1 in aqcf's
    assert len([1 for p, r in cases.values() if _counts(p, r, (2,))[:3] != (0, 0, 0)]) == 3
    assert summary["per_modality"]["ct"]["tumor"]["dice"]["mean"] == pytest.approx((3 * dice["2"] + 1) / 4)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(np.mean(list(dice.values())), abs=1e-12)
    # nnU-Net reads the keys back as a region tuple and a label
    assert {ast.literal_eval(k) for k in summary["mean"]} == {(1, 2), 2}


def test_the_project_tables_stay(evaluated):
    _, root = evaluated
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert set(summary) >= {"metrics", "units", "n_cases", "per_modality", "source",
                            "metric_per_case", "mean", "foreground_mean"}
    assert summary["n_cases"] == {"ct": 4}
