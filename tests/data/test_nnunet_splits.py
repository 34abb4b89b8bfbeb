"""The stratified folds written by ``aqcf export-nnunet`` (without ``--splits``) and ``aqcf preprocess``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from aqcf.cli import main

N_CASES, N_FOLDS = 10, 5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Ten CT phantoms (LiTS layout), four with tumor and six without (seed 0), and each case's tumor flag."""
    from aqcf.data.phantoms import ct_config, synthesize

    out = tmp_path_factory.mktemp("cohort")
    synthesize(out, n_ct=N_CASES, n_mri=0, ct=ct_config(shape=(32, 32, 16), n_tumors=(0, 1)), seed=0,
               progress=False)
    flags = {}
    for label in (out / "LiTS").rglob("segmentation-*.nii*"):
        number = label.name.split("-")[1].split(".")[0]
        flags[f"lits-{number}"] = bool((np.asanyarray(nib.load(label).dataobj) == 2).any())
    return out / "LiTS", flags


def _check_stratified(folds, flags):
    with_tumor = sum(flags.values())
    assert 0 < with_tumor < N_FOLDS < N_CASES - with_tumor  # the cohort the test needs: 4 with, 6 without
    assert len(folds) == N_FOLDS
    assert sorted(i for fold in folds for i in fold["val"]) == sorted(flags)
    for fold in folds:
        assert set(fold["train"]) == set(flags) - set(fold["val"])
        # tumor cases spread as evenly as possible: at most one per fold here
        assert sum(flags[i] for i in fold["val"]) in (with_tumor // N_FOLDS, -(-with_tumor // N_FOLDS))
    # fold 0 validates on a mix: tumor-free cases next to a tumor case
    assert {flags[i] for i in folds[0]["val"]} == {True, False}


def test_export_nnunet_writes_stratified_folds_by_default(cohort, tmp_path, capsys):
    root, flags = cohort
    assert main(["export-nnunet", str(root), "--format", "lits", "--modality", "ct", "--id", "101",
                 "--name", "LiTS", "--out", str(tmp_path / "raw")]) == 0
    assert "splits_final.json" in capsys.readouterr().out
    _check_stratified(json.loads((tmp_path / "raw" / "Dataset101_LiTS" / "splits_final.json").read_text()), flags)

    assert main(["export-nnunet", str(root), "--format", "lits", "--modality", "ct", "--id", "102",
                 "--name", "LiTS", "--out", str(tmp_path / "raw"), "--n-folds", "2"]) == 0
    assert len(json.loads((tmp_path / "raw" / "Dataset102_LiTS" / "splits_final.json").read_text())) == 2


def test_preprocess_writes_the_data_modules_splits_file(cohort, tmp_path, capsys):
    root, flags = cohort
    args = ["preprocess", "--data", str(root), "--format", "lits", "--modality", "ct", "--cache", str(tmp_path),
            "--spacing", "2", "2", "3", "--no-progress"]
    assert main(args) == 0
    splits = tmp_path / "ct" / "splits.json"  # UnpairedDataModule's path for data.cache_dir = --cache
    folds = json.loads(splits.read_text())
    _check_stratified(folds, flags)

    # the same folds as export-nnunet makes for nnU-Net
    assert main(["export-nnunet", str(root), "--format", "lits", "--modality", "ct", "--id", "101",
                 "--name", "LiTS", "--out", str(tmp_path / "raw")]) == 0
    assert json.loads((tmp_path / "raw" / "Dataset101_LiTS" / "splits_final.json").read_text()) == folds

    # once written the file is the source of truth (as for aqcf fit): another seed does not redraw it
    assert main([*args, "--split-seed", "7"]) == 0
    assert json.loads(splits.read_text()) == folds
    capsys.readouterr()
