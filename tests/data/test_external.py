"""External cohorts: 3D-IRCADb-01 DICOM series written in the real layout, and a LiverHccSeg folder."""

from __future__ import annotations

import json
import os
import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest

from aqcf.data.cohorts import read_cohort
from aqcf.data.external import is_ircadb_liver_tumor, read_ircadb, read_liverhccseg
from aqcf.errors import AqcfError
from aqcf.evaluation.evaluate import evaluate_folder
from tests.dicom_writer import write_ct_slice

ROWS, COLUMNS, SLICES = 12, 16, 6  # non-square so a transposed slice cannot pass
ROW_SPACING, COLUMN_SPACING = 0.7, 0.8  # DICOM PixelSpacing = [between rows, between columns]
SLICE_STEP = 2.5
ORIGIN = np.array([-40.0, -30.0, 100.0])  # ImagePositionPatient of the *top* slice (largest z)
# file index K -> which slice (0 = lowest z) it holds: shuffled, and the instance numbers run
# top-down, opposite to the z order
FILE_TO_SLICE = [3, 0, 5, 1, 4, 2]
MASK_FILE_TO_SLICE = [2, 5, 0, 4, 1, 3]


def _z(slice_index):
    """z (mm) of slice ``slice_index`` counted from the lowest."""
    return ORIGIN[2] - (SLICES - 1 - slice_index) * SLICE_STEP


def _hu(slice_index):
    """The HU written into one slice: (rows, columns), unique per slice, row and column."""
    rows, columns = np.mgrid[0:ROWS, 0:COLUMNS]
    return (-500 + 100 * slice_index + 10 * rows + columns).astype(np.int16)


def _write_slice(path, pixels, slice_index, bits=16, intercept=None, geometry=True):
    position = [float(ORIGIN[0]), float(ORIGIN[1]), float(_z(slice_index))] if geometry else None
    write_ct_slice(path, pixels, spacing=(ROW_SPACING, COLUMN_SPACING), position=position,
                   instance=SLICES - slice_index, thickness=SLICE_STEP, bits=bits, intercept=intercept)


def _region(lo, hi):
    """Boolean (rows, columns, slices) box, slices counted from the lowest z."""
    mask = np.zeros((ROWS, COLUMNS, SLICES), dtype=bool)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return mask


LIVER = _region((2, 3, 1), (10, 13, 5))
TUMOR_A = _region((3, 4, 2), (5, 6, 4))  # livertumor01, inside the liver
TUMOR_B = _region((7, 10, 1), (9, 12, 2))  # livertumor2, inside the liver
ADRENAL = _region((0, 0, 0), (2, 2, 6))  # "tumor" (patient 7's adrenal lesion): not liver tumor
MASKS = {"liver": LIVER, "livertumor01": TUMOR_A, "livertumor2": TUMOR_B, "tumor": ADRENAL,
         "leftsurretumor": _region((10, 0, 0), (12, 2, 3)), "liverkyst": _region((5, 8, 3), (6, 9, 4)),
         "portalvein": _region((4, 7, 1), (6, 9, 5))}


def _write_patient(folder, mask_geometry=True):
    for k, slice_index in enumerate(FILE_TO_SLICE):
        stored = _hu(slice_index) + 1024
        _write_slice(folder / "PATIENT_DICOM" / f"image_{k}", stored, slice_index, intercept=-1024)
    for structure, mask in MASKS.items():
        for k, slice_index in enumerate(MASK_FILE_TO_SLICE):
            pixels = mask[:, :, slice_index].astype(np.uint8) * 255
            _write_slice(folder / "MASKS_DICOM" / structure / f"image_{k}", pixels, slice_index, bits=8,
                         geometry=mask_geometry)


def _zip_folder(folder, name):
    with zipfile.ZipFile(folder / f"{name}.zip", "w") as archive:
        for path in sorted((folder / name).rglob("*")):
            archive.write(path, path.relative_to(folder).as_posix())
    shutil.rmtree(folder / name)


@pytest.fixture(scope="module")
def ircadb(tmp_path_factory):
    root = tmp_path_factory.mktemp("ircadb") / "3Dircadb1"
    _write_patient(root / "3Dircadb1.10")
    # patient 2 as distributed: zips, one nesting level deeper
    _write_patient(root / "nested" / "3Dircadb1.2")
    _zip_folder(root / "nested" / "3Dircadb1.2", "PATIENT_DICOM")
    _zip_folder(root / "nested" / "3Dircadb1.2", "MASKS_DICOM")
    return root


def test_tumor_folder_rule():
    for name in ("livertumor", "livertumors", "livertumor01", "livertumor07", "livertumor1", "LiverTumor2"):
        assert is_ircadb_liver_tumor(name), name
    for name in ("tumor", "leftsurretumor", "rightsurretumor", "liverkyst", "liver", "portalvein"):
        assert not is_ircadb_liver_tumor(name), name


def test_ircadb_label_geometry_and_hu(ircadb, tmp_path):
    cases = read_ircadb(ircadb, cache_dir=tmp_path / "cache")
    assert [c.id for c in cases] == ["3Dircadb1.2", "3Dircadb1.10"]  # natural order
    assert {c.modality for c in cases} == {"ct"}
    expected_label = np.zeros((ROWS, COLUMNS, SLICES), np.uint8)
    expected_label[LIVER] = 1
    expected_label[TUMOR_A | TUMOR_B] = 2
    for case in cases:
        image, label = nib.load(case.image), nib.load(case.label)
        data = np.asarray(image.dataobj)
        # NIfTI axes: (column, row, slice from the lowest z)
        assert data.shape == (COLUMNS, ROWS, SLICES)
        for s in range(SLICES):
            np.testing.assert_array_equal(data[:, :, s], _hu(s).T)
        np.testing.assert_array_equal(np.asarray(label.dataobj), expected_label.transpose(1, 0, 2))
        # voxel (i=column, j=row, k) sits at LPS = (x0 + i*0.8, y0 + j*0.7, z_k); RAS negates x and y
        for i, j, k in ((0, 0, 0), (15, 0, 0), (0, 11, 0), (3, 7, 5), (15, 11, 4)):
            lps = np.array([ORIGIN[0] + i * COLUMN_SPACING, ORIGIN[1] + j * ROW_SPACING, _z(k)])
            ras = lps * np.array([-1.0, -1.0, 1.0])
            np.testing.assert_allclose(image.affine @ [i, j, k, 1.0], [*ras, 1.0], atol=1e-4)
        np.testing.assert_allclose(label.affine, image.affine)
        assert image.header.get_zooms()[:3] == pytest.approx((COLUMN_SPACING, ROW_SPACING, SLICE_STEP))
    record = json.loads((tmp_path / "cache" / "records" / "3Dircadb1.10.json").read_text())
    assert sorted(record["liver_tumor"]) == ["livertumor01", "livertumor2"]
    assert "tumor" in record["ignored"]


def test_ircadb_masks_without_positions_match_by_instance_number(tmp_path):
    _write_patient(tmp_path / "data" / "3Dircadb1.7", mask_geometry=False)
    (case,) = read_ircadb(tmp_path / "data", cache_dir=tmp_path / "cache")
    label = np.asarray(nib.load(case.label).dataobj).transpose(1, 0, 2)  # back to (rows, columns, z)
    assert np.array_equal(label == 2, TUMOR_A | TUMOR_B)
    assert np.array_equal(label > 0, LIVER)


def test_ircadb_converts_once(ircadb, tmp_path, monkeypatch):
    first = read_ircadb(ircadb, cache_dir=tmp_path / "cache")
    stamp = first[0].label.stat().st_mtime_ns
    assert read_ircadb(ircadb, cache_dir=tmp_path / "cache")[0].label.stat().st_mtime_ns == stamp
    changed = ircadb / "nested" / "3Dircadb1.2" / "MASKS_DICOM.zip"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert read_ircadb(ircadb, cache_dir=tmp_path / "cache")[0].label.stat().st_mtime_ns != stamp

    monkeypatch.setenv("AQCF_CACHE", str(tmp_path / "default"))
    again = read_cohort(ircadb, "ircadb", "ct")  # the registered reader, default cache
    assert [c.id for c in again] == [c.id for c in first]
    assert again[0].label == tmp_path / "default" / "ircadb" / "labelsTs" / "3Dircadb1.2.nii.gz"


def test_ircadb_errors(tmp_path):
    with pytest.raises(AqcfError, match="no 3Dircadb1.N folders"):
        read_ircadb(tmp_path, cache_dir=tmp_path / "cache")
    patient = tmp_path / "3Dircadb1.3"
    (patient / "PATIENT_DICOM").mkdir(parents=True)
    with pytest.raises(AqcfError, match="MASKS_DICOM"):
        read_ircadb(tmp_path, cache_dir=tmp_path / "cache")


def test_evaluate_against_ircadb(ircadb, tmp_path):
    cases = read_ircadb(ircadb, cache_dir=tmp_path / "cache")
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for case in cases:  # a perfect prediction, named as `aqcf segment` names it: after the image
        shutil.copy(case.label, pred_dir / case.image.name)
    summary = evaluate_folder(pred_dir, ircadb, tmp_path / "out", ref_format="ircadb",
                              reader_options={"cache_dir": tmp_path / "cache"}, progress=False)
    assert summary["per_modality"]["ct"]["tumor"]["dice"]["mean"] == pytest.approx(1.0)
    assert summary["n_cases"] == {"ct": 2}


# ------------------------------------------------------------------------------------ LiverHccSeg

GRID = np.diag([1.5, 1.5, 4.0, 1.0])


def _nii(path, data, affine=GRID):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.fixture
def liverhccseg(tmp_path):
    root = tmp_path / "LiverHccSeg"
    shape = (10, 10, 4)
    liver = np.zeros(shape, np.uint8)
    liver[2:8, 2:8, 1:3] = 1
    tumor = np.zeros(shape, np.uint8)
    tumor[3:5, 3:5, 1:2] = 255  # masks may use any non-zero value
    for case in ("TCGA-A", "TCGA-B"):
        folder = root / case
        _nii(folder / "arterial.nii.gz", np.full(shape, 7.0, np.float32))
        _nii(folder / "portal_venous.nii.gz", np.full(shape, 9.0, np.float32))
        _nii(folder / "R1_liver.nii.gz", liver)
        _nii(folder / "R2_liver.nii.gz", np.roll(liver, 1, axis=0))
        _nii(folder / "R2_tumor.nii.gz", tumor)
    _nii(root / "TCGA-A" / "R1_tumor.nii.gz", tumor)  # TCGA-B has no R1 tumor mask
    return root, liver, tumor


def test_liverhccseg_default_layout(liverhccseg, tmp_path):
    root, liver, tumor = liverhccseg
    with pytest.warns(UserWarning, match="TCGA-B"):
        cases = read_liverhccseg(root, cache_dir=tmp_path / "cache")
    assert [c.id for c in cases] == ["TCGA-A"]
    case = cases[0]
    assert case.modality == "mri" and case.image.name == "arterial.nii.gz"
    expected = liver.copy()
    expected[tumor > 0] = 2
    label = nib.load(case.label)
    np.testing.assert_array_equal(np.asarray(label.dataobj), expected)
    np.testing.assert_allclose(label.affine, GRID)


def test_liverhccseg_phase_rater_and_missing_masks(liverhccseg, tmp_path):
    root, liver, tumor = liverhccseg
    cases = read_liverhccseg(root, phase="portal_venous", rater="R2", cache_dir=tmp_path / "cache")
    assert [c.id for c in cases] == ["TCGA-A", "TCGA-B"]
    assert cases[1].image.name == "portal_venous.nii.gz"
    label = np.asarray(nib.load(cases[1].label).dataobj)
    assert (label == 1).sum() == (np.roll(liver, 1, axis=0) > 0).sum() - (tumor > 0).sum()
    assert (label == 2).sum() == (tumor > 0).sum()

    empty = read_liverhccseg(root, missing_mask="empty", cache_dir=tmp_path / "cache")
    assert np.asarray(nib.load(empty[1].label).dataobj).max() == 1  # no tumor mask: no label 2
    with pytest.raises(AqcfError, match=r"TCGA-B: no tumor"):
        read_liverhccseg(root, missing_mask="error", cache_dir=tmp_path / "cache")


def test_liverhccseg_mask_on_another_grid(liverhccseg, tmp_path):
    root, liver, _ = liverhccseg
    _nii(root / "TCGA-A" / "R1_liver.nii.gz", liver[:, :, :3])
    with pytest.raises(AqcfError, match="R1_liver.nii.gz: voxel grid"):
        read_liverhccseg(root, cache_dir=tmp_path / "cache")
