"""Readers find the real data sets' layouts; every bad input ends in a one-line error naming the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from aqcf.data.cohorts import (
    Case,
    natural_key,
    read_atlas,
    read_cohort,
    read_lits,
    read_nnunet,
    validate_case,
)
from aqcf.errors import AqcfError

SHAPE = (8, 8, 4)


def _nifti(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(SHAPE, np.int16) if data is None else data
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine), str(path))
    return path


def _label(path: Path, values=(0, 1, 2), dtype=np.uint8, shape=SHAPE, affine=None) -> Path:
    data = np.zeros(shape, dtype)
    flat = data.reshape(-1)
    flat[: len(values)] = values
    return _nifti(path, data, affine)


# --- LiTS -----------------------------------------------------------------------------------------


def test_lits_flat_uncompressed(tmp_path):
    for n in (0, 2, 10, 9):
        _nifti(tmp_path / f"volume-{n}.nii")
        _label(tmp_path / f"segmentation-{n}.nii")
    _nifti(tmp_path / "test-volume-0.nii")  # the unlabeled test set is ignored
    cases = read_lits(tmp_path)
    assert [c.id for c in cases] == ["lits-0", "lits-2", "lits-9", "lits-10"]
    assert cases[3] == Case("lits-10", "ct", tmp_path / "volume-10.nii", tmp_path / "segmentation-10.nii")


def test_lits_training_batches_gzipped_and_mixed(tmp_path):
    for n in range(3):
        _nifti(tmp_path / "Training_Batch1" / f"volume-{n}.nii.gz")
        _label(tmp_path / "Training_Batch1" / f"segmentation-{n}.nii.gz")
    for n in (28, 29):
        _nifti(tmp_path / "Training_Batch2" / f"volume-{n}.nii")
        _label(tmp_path / "Training_Batch2" / f"segmentation-{n}.nii")
    (tmp_path / "Training_Batch2" / "._volume-28.nii").write_bytes(b"\x00\x05")  # macOS resource fork
    cases = read_cohort(tmp_path, "lits", "ct")
    assert [c.id for c in cases] == ["lits-0", "lits-1", "lits-2", "lits-28", "lits-29"]
    assert cases[0].label == tmp_path / "Training_Batch1" / "segmentation-0.nii.gz"
    assert cases[-1].image == tmp_path / "Training_Batch2" / "volume-29.nii"


def test_lits_missing_label_names_the_volume(tmp_path):
    _nifti(tmp_path / "volume-0.nii")
    _label(tmp_path / "segmentation-0.nii")
    _nifti(tmp_path / "volume-1.nii")
    with pytest.raises(AqcfError, match=r"volume-1\.nii: no label file segmentation-1"):
        read_lits(tmp_path)


def test_lits_label_without_volume_and_duplicates(tmp_path):
    _label(tmp_path / "segmentation-4.nii")
    with pytest.raises(AqcfError, match=r"segmentation-4\.nii: no image file volume-4"):
        read_lits(tmp_path)
    _nifti(tmp_path / "volume-4.nii")
    _nifti(tmp_path / "copy" / "volume-4.nii.gz")
    with pytest.raises(AqcfError, match="appears twice"):
        read_lits(tmp_path)


def test_lits_empty_folder_says_what_was_looked_for(tmp_path):
    with pytest.raises(AqcfError, match=r"no LiTS case found.*volume-N\.nii"):
        read_lits(tmp_path)
    _nifti(tmp_path / "test-volume-3.nii")
    with pytest.raises(AqcfError, match="only unlabeled test-volume"):
        read_lits(tmp_path)
    with pytest.raises(AqcfError, match="no such folder"):
        read_lits(tmp_path / "absent")


# --- ATLAS ----------------------------------------------------------------------------------------


def test_atlas_nested_twice_natural_order(tmp_path):
    train = tmp_path / "atlas-train-dataset-1.0.1" / "atlas-train-dataset-1.0.1" / "train"
    for n in (0, 1, 9, 10):
        _nifti(train / "imagesTr" / f"im{n}.nii.gz")
        _label(train / "labelsTr" / f"lb{n}.nii.gz")
    (train / "dataset.json").write_text("{}")
    cases = read_atlas(tmp_path)
    assert [c.id for c in cases] == ["atlas-0", "atlas-1", "atlas-9", "atlas-10"]
    assert all(c.modality == "mri" for c in cases)
    assert cases[2].image.name == "im9.nii.gz" and cases[2].label.name == "lb9.nii.gz"


def test_atlas_errors(tmp_path):
    with pytest.raises(AqcfError, match="no ATLAS case found"):
        read_atlas(tmp_path)
    _nifti(tmp_path / "imagesTr" / "im0.nii.gz")
    with pytest.raises(AqcfError, match="no labelsTr/ folder beside it"):
        read_atlas(tmp_path)
    _label(tmp_path / "labelsTr" / "lb1.nii.gz")
    with pytest.raises(AqcfError, match=r"im0\.nii\.gz: no label file labelsTr/lb0"):
        read_atlas(tmp_path)
    _nifti(tmp_path / "copy" / "imagesTr" / "im0.nii.gz")
    with pytest.raises(AqcfError, match="several imagesTr"):
        read_atlas(tmp_path)


# --- nnU-Net / MSD --------------------------------------------------------------------------------


def test_nnunet_v2_layout(tmp_path):
    root = tmp_path / "Dataset003_Liver"
    for case in ("liver_10", "liver_2"):
        _nifti(root / "imagesTr" / f"{case}_0000.nii.gz")
        _label(root / "labelsTr" / f"{case}.nii.gz")
    _nifti(root / "imagesTs" / "liver_99_0000.nii.gz")
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "tumor": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    cases = read_nnunet(tmp_path, "ct")
    assert [c.id for c in cases] == ["liver_2", "liver_10"]
    assert cases[0].image.name == "liver_2_0000.nii.gz" and cases[0].label.name == "liver_2.nii.gz"


def test_msd_layout_with_resource_forks(tmp_path):
    root = tmp_path / "Task03_Liver"
    for case in ("liver_0", "liver_1"):
        _nifti(root / "imagesTr" / f"{case}.nii.gz")
        _label(root / "labelsTr" / f"{case}.nii.gz")
        (root / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"\x00")
        (root / "labelsTr" / f"._{case}.nii.gz").write_bytes(b"\x00")
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background"}}))
    cases = read_cohort(root, "nnunet", "ct")
    assert [(c.id, c.image.name) for c in cases] == [
        ("liver_0", "liver_0.nii.gz"),
        ("liver_1", "liver_1.nii.gz"),
    ]


def test_nnunet_errors(tmp_path):
    root = tmp_path / "Dataset001_X"
    _nifti(root / "imagesTr" / "a_0000.nii.gz")
    _nifti(root / "imagesTr" / "a_0001.nii.gz")
    _label(root / "labelsTr" / "a.nii.gz")
    with pytest.raises(AqcfError, match=r"a_0001\.nii\.gz: channel 0001"):
        read_nnunet(root, "mri")
    (root / "imagesTr" / "a_0001.nii.gz").unlink()
    _nifti(root / "imagesTr" / "b_0000.nii.gz")
    with pytest.raises(AqcfError, match=r"b_0000\.nii\.gz: no label file labelsTr/b\.nii\.gz"):
        read_nnunet(root, "mri")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}}))
    with pytest.raises(AqcfError, match="2 input channels"):
        read_nnunet(root, "mri")


def test_read_cohort_rejects_unknown_format_and_modality(tmp_path):
    with pytest.raises(AqcfError, match="format 'dicomdir' unknown.*atlas.*lits.*nnunet"):
        read_cohort(tmp_path, "dicomdir", "ct")
    with pytest.raises(AqcfError, match="'ct-2' is not a name"):
        read_cohort(tmp_path, "lits", "ct-2")
    with pytest.raises(AqcfError, match="neither 'ct' nor 'mri'"):
        read_cohort(tmp_path, "lits", "pet", ("ct", "mri"))
    with pytest.raises(AqcfError, match="'pet' is none of ct, mri, t2"):
        read_cohort(tmp_path, "lits", "pet", ("ct", "mri", "t2"))


def test_natural_key():
    assert sorted(["im10", "im9", "im100", "im1"], key=natural_key) == ["im1", "im9", "im10", "im100"]


# --- validation -----------------------------------------------------------------------------------


def _case(tmp_path, **label_kwargs) -> Case:
    image = _nifti(tmp_path / "volume-0.nii")
    label = _label(tmp_path / "segmentation-0.nii", **label_kwargs)
    return Case("lits-0", "ct", image, label)


def test_valid_case_passes(tmp_path):
    validate_case(_case(tmp_path))
    validate_case(Case("x", "ct", _nifti(tmp_path / "unlabeled.nii"), None))


def test_unreadable_image_and_truncated_label(tmp_path):
    case = _case(tmp_path)
    bad = tmp_path / "volume-1.nii"
    bad.write_text("this is not a NIfTI file\n")
    with pytest.raises(AqcfError, match=r"volume-1\.nii: unreadable image"):
        validate_case(Case("lits-1", "ct", bad, case.label))
    gz = _label(tmp_path / "segmentation-2.nii.gz", shape=(64, 64, 32))
    payload = gzip.decompress(gz.read_bytes())
    gz.write_bytes(gzip.compress(payload)[: len(gzip.compress(payload)) // 2])
    image = _nifti(tmp_path / "volume-2.nii", np.zeros((64, 64, 32), np.int16))
    with pytest.raises(AqcfError, match=r"segmentation-2\.nii\.gz: truncated or damaged file"):
        validate_case(Case("lits-2", "ct", image, gz))


def test_shape_and_affine_mismatch(tmp_path):
    with pytest.raises(AqcfError, match=r"segmentation-0\.nii: shape \(8, 8, 5\) differs"):
        validate_case(_case(tmp_path, shape=(8, 8, 5)))
    shifted = np.diag([0.8, 0.8, 2.5, 1.0])
    shifted[0, 3] = 0.5  # half a millimetre
    with pytest.raises(AqcfError, match=r"segmentation-0\.nii: affine differs .* by up to 0\.5 mm"):
        validate_case(_case(tmp_path, affine=shifted))
    shifted[0, 3] = 1e-4  # rounding noise is tolerated
    validate_case(_case(tmp_path, affine=shifted))


def test_label_values_outside_range(tmp_path):
    with pytest.raises(AqcfError, match=r"segmentation-0\.nii: label values \{3\} outside \{0, 1, 2\}"):
        validate_case(_case(tmp_path, values=(0, 1, 3)))
    with pytest.raises(AqcfError, match=r"label values \{0\.5\}"):
        validate_case(_case(tmp_path, values=(0, 0.5, 2), dtype=np.float32))
    validate_case(_case(tmp_path, values=(0, 1.0, 2.0), dtype=np.float32))  # float storage of valid labels
    validate_case(_case(tmp_path, values=(0, 2), dtype=np.int16))


def test_four_dimensional_image_rejected(tmp_path):
    image = _nifti(tmp_path / "volume-0.nii", np.zeros((*SHAPE, 2), np.int16))
    with pytest.raises(AqcfError, match=r"volume-0\.nii: 4D image of shape \(8, 8, 4, 2\) \(2 volumes or channels\)"):
        validate_case(Case("lits-0", "ct", image, None))
