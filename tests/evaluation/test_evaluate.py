"""``aqcf evaluate`` on tiny NIfTI folders: pairing, errors naming files, the files it writes."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from aqcf.cli import main as aqcf_main
from aqcf.errors import AqcfError
from aqcf.evaluation.evaluate import evaluate_folder

SPACING = (1.0, 1.0, 3.0)


def _save(path, label, spacing=SPACING):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))


def _cases():
    """Three reference/prediction pairs with hand-computed answers (see the test)."""
    shape = (9, 9, 10)
    ref_a = np.zeros(shape, np.uint8)
    ref_a[1:7, 1:7, 1:7] = 1
    ref_a[2:4, 2:4, 2:4] = 2  # 8 tumor voxels
    pred_a = ref_a.copy()  # perfect

    ref_b = ref_a.copy()
    pred_b = ref_a.copy()
    pred_b[pred_b == 2] = 1  # tumor missed, still called liver

    ref_c = np.zeros(shape, np.uint8)  # tumor-free; 3x3x3 liver shifted by 2 slices of 3 mm
    ref_c[3:6, 3:6, 1:4] = 1
    pred_c = np.zeros(shape, np.uint8)
    pred_c[3:6, 3:6, 3:6] = 1
    return {"a": (pred_a, ref_a), "b": (pred_b, ref_b), "c": (pred_c, ref_c)}


@pytest.fixture
def folders(tmp_path):
    for name, (pred, ref) in _cases().items():
        _save(tmp_path / "pred" / f"{name}.nii.gz", pred)
        _save(tmp_path / "ref" / f"{name}.nii.gz", ref)
    return tmp_path / "pred", tmp_path / "ref", tmp_path / "out"


def _read_rows(path):
    with open(path, newline="") as handle:
        return {(r["case"], r["class"]): r for r in csv.DictReader(handle)}


def test_plain_folders_metrics_and_summary(folders):
    pred, ref, out = folders
    evaluate_folder(pred, ref, out, modality="ct", progress=False)
    rows = _read_rows(out / "metrics.csv")
    assert len(rows) == 6
    assert float(rows["a", "tumor"]["dice"]) == pytest.approx(1.0)
    assert float(rows["b", "liver"]["dice"]) == pytest.approx(1.0)  # liver = labels 1 and 2
    assert float(rows["b", "tumor"]["dice"]) == 0.0
    assert math.isnan(float(rows["b", "tumor"]["hd95"]))
    # case c: the two 3x3x3 cubes of the metrics test, shift of 2 slices x 3 mm: Dice 1/3,
    # HD95 6 mm, MSD 3 mm (taken from the reference header's spacing)
    assert float(rows["c", "liver"]["dice"]) == pytest.approx(1 / 3, abs=1e-6)
    assert float(rows["c", "liver"]["hd95"]) == pytest.approx(6.0, abs=1e-5)
    assert float(rows["c", "liver"]["msd"]) == pytest.approx(3.0, abs=1e-5)
    assert rows["c", "tumor"]["ref_voxels"] == "0" and float(rows["c", "tumor"]["dice"]) == 1.0
    assert rows["a", "liver"]["modality"] == "ct"

    summary = json.loads((out / "summary.json").read_text())
    tumor = summary["per_modality"]["ct"]["tumor"]
    assert tumor["dice"]["mean"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    # pooled over cases: a has 8/8/8 voxels, b 0 predicted of 8, c none
    assert tumor["pooled_dice"] == pytest.approx(2 * 8 / (8 + 8 + 0 + 8))
    assert (tumor["hd95"]["n"], tumor["hd95"]["n_undefined"]) == (2, 1)
    assert tumor["n_ref_empty"] == 1
    assert summary["n_cases"] == {"ct": 3}


def test_missing_prediction_is_an_error_naming_it(folders):
    pred, ref, out = folders
    (pred / "b.nii.gz").unlink()
    with pytest.raises(AqcfError, match=r"no prediction for reference case b"):
        evaluate_folder(pred, ref, out, modality="ct", progress=False)
    assert not out.exists()


def test_prediction_without_reference_is_an_error(folders):
    pred, ref, out = folders
    _save(pred / "zz.nii.gz", np.zeros((9, 9, 10), np.uint8))
    with pytest.raises(AqcfError, match=r"zz\.nii\.gz: prediction without a reference"):
        evaluate_folder(pred, ref, out, modality="ct", progress=False)


def test_shape_mismatch_names_both_files(folders):
    pred, ref, out = folders
    _save(pred / "a.nii.gz", np.zeros((9, 9, 11), np.uint8))
    with pytest.raises(AqcfError) as err:
        evaluate_folder(pred, ref, out, modality="ct", progress=False)
    assert str(pred / "a.nii.gz") in str(err.value) and str(ref / "a.nii.gz") in str(err.value)


def test_existing_results_need_overwrite(folders):
    pred, ref, out = folders
    evaluate_folder(pred, ref, out, modality="mri", progress=False)
    before = (out / "summary.json").read_text()
    with pytest.raises(AqcfError, match="--overwrite"):
        evaluate_folder(pred, ref, out, modality="ct", progress=False)
    assert (out / "summary.json").read_text() == before
    evaluate_folder(pred, ref, out, modality="ct", overwrite=True, progress=False)
    assert "ct" in json.loads((out / "summary.json").read_text())["per_modality"]


def test_plain_references_need_a_modality(folders):
    pred, ref, out = folders
    with pytest.raises(AqcfError, match="--modality"):
        evaluate_folder(pred, ref, out, progress=False)


def test_lits_layout_matches_predictions_named_after_the_volume(tmp_path):
    cases = _cases()
    for number, key in ((0, "a"), (7, "c")):
        pred, ref = cases[key]
        _save(tmp_path / "LiTS" / "Training_Batch1" / f"segmentation-{number}.nii", ref)
        _save(tmp_path / "LiTS" / "Training_Batch1" / f"volume-{number}.nii", ref)
        _save(tmp_path / "pred" / f"volume-{number}.nii.gz", pred)
    evaluate_folder(tmp_path / "pred", tmp_path / "LiTS", tmp_path / "out", ref_format="lits", progress=False)
    rows = _read_rows(tmp_path / "out" / "metrics.csv")
    assert {case for case, _ in rows} == {"lits-0", "lits-7"}
    assert rows["lits-0", "liver"]["modality"] == "ct"  # from the reader
    assert float(rows["lits-7", "liver"]["hd95"]) == pytest.approx(6.0, abs=1e-5)


def test_command_line(folders, capsys):
    pred, ref, out = folders
    code = aqcf_main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out),
                      "--modality", "ct", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tumor" in printed and "pooled" in printed
    assert (out / "metrics.csv").is_file()

    (pred / "c.nii.gz").unlink()
    code = aqcf_main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out / "again"),
                      "--modality", "ct", "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("aqcf: error:") and "reference case c" in error and len(error.splitlines()) == 1


def test_label_values_outside_0_1_2_name_the_file(folders):
    pred, ref, out = folders
    bad = np.zeros((9, 9, 10), np.uint8)
    bad[0, 0, 0] = 5
    _save(pred / "a.nii.gz", bad)
    with pytest.raises(AqcfError, match=r"a\.nii\.gz: label values \{5\} outside \{0, 1, 2\}"):
        evaluate_folder(pred, ref, out, modality="ct", progress=False)
