"""aqcf segment on DICOM: several series in one folder (--series), non-image series, --dicom-seg output."""

from __future__ import annotations

import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from aqcf.cli import main
from tests.dicom_writer import write_ct_slice

FAST = ["--overlap", "0.25", "--no-progress"]
HU_FLOOR = -1024  # stored values are HU + 1024, unsigned


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return str(tiny_run / "checkpoints" / "best.ckpt")


def _write_series(folder: Path, hu: np.ndarray, series_uid: str, prefix: str, description: str) -> list[str]:
    """``hu`` (columns, rows, slices) as axial slices in shuffled file order; returns SOP UIDs by position."""
    study, frame = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    order = list(range(hu.shape[2]))
    random.Random(len(prefix)).shuffle(order)
    uids = {}
    for k, z in enumerate(order):
        path = folder / f"{prefix}{k:04d}"
        stored = (hu[:, :, z].T.astype(np.int32) - HU_FLOOR).astype(np.uint16)  # (rows, columns)
        write_ct_slice(path, stored, spacing=(2.0, 2.0), position=(-40.0, -40.0, 3.0 * z), instance=k + 1,
                       thickness=3.0, intercept=HU_FLOOR, series_uid=series_uid)
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = study, frame
        ds.PatientID, ds.PatientName, ds.SeriesDescription = "P7", "Phantom^Seven", description
        ds.save_as(path)
        uids[z] = str(ds.SOPInstanceUID)
    return [uids[z] for z in range(hu.shape[2])]


@pytest.fixture()
def two_series(tiny_phantoms, tmp_path):
    ct = np.asarray(nib.load(tiny_phantoms / "LiTS" / "volume-1.nii").dataobj).astype(np.int16)
    hu = np.maximum(ct, HU_FLOOR)
    folder = tmp_path / "patient7"
    first, second = generate_uid(), generate_uid()
    uids = _write_series(folder, hu, first, "A", "portal venous")
    _write_series(folder, np.maximum(hu[::-1], HU_FLOOR), second, "B", "arterial")
    return folder, first, second, uids


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("aqcf: error: ")
    return lines[0]


def test_a_folder_with_two_series_is_one_error_listing_them(two_series, ckpt, tmp_path, capsys):
    folder, first, second, _ = two_series
    code = main(["segment", str(folder), "--modality", "ct", "--ckpt", ckpt, "--out", str(tmp_path / "o"), *FAST])
    assert code == 2
    line = _error_line(capsys)
    assert "holds 2 DICOM series, choose one with --series UID" in line
    assert f"{first} ('portal venous', CT, 24 slices)" in line and f"{second} ('arterial', CT, 24 slices)" in line
    code = main(["segment", str(folder), "--modality", "ct", "--ckpt", ckpt, "--out", str(tmp_path / "o"),
                 "--series", "1.2.3", *FAST])
    assert code == 2 and "no series with SeriesInstanceUID 1.2.3" in _error_line(capsys)


def test_series_chosen_by_uid_is_that_series_alone(two_series, ckpt, tmp_path):
    from aqcf.data.dicom import read_dicom_series

    folder, first, second, _ = two_series
    for uid, name in ((first, "a"), (second, "b")):
        assert main(["segment", str(folder), "--series", uid, "--modality", "ct", "--ckpt", ckpt,
                     "--out", str(tmp_path / name), *FAST]) == 0
    volume_a, _ = read_dicom_series(folder, first)
    volume_b, _ = read_dicom_series(folder, second)
    assert volume_a.shape == volume_b.shape == (48, 48, 24)
    np.testing.assert_array_equal(volume_b, volume_a[::-1])  # each series read alone, never mixed
    mask_a = nib.load(tmp_path / "a" / "patient7_seg.nii.gz")
    assert mask_a.shape == (48, 48, 24)


def test_a_non_image_series_is_refused(tmp_path, ckpt, capsys):
    folder = tmp_path / "sr"
    write_ct_slice(folder / "IM0", np.zeros((4, 4), np.uint16), spacing=(1, 1), position=(0, 0, 0), series_uid="1.9")
    ds = pydicom.dcmread(folder / "IM0")
    ds.Modality = "SEG"
    ds.save_as(folder / "IM0")
    assert main(["segment", str(folder), "--modality", "ct", "--ckpt", ckpt, "--out", str(tmp_path / "o")]) == 2
    assert "is not an image series (Modality SEG)" in _error_line(capsys)


def test_dicom_seg_references_the_source_and_equals_the_mask(two_series, ckpt, tmp_path):
    folder, first, _, source_uids = two_series
    out = tmp_path / "out"
    assert main(["segment", str(folder), "--series", first, "--modality", "ct", "--ckpt", ckpt, "--out", str(out),
                 "--dicom-seg", *FAST]) == 0
    mask = np.asarray(nib.load(out / "patient7_seg.nii.gz").dataobj)  # (columns, rows, slices by position)
    assert (mask == 1).any()
    seg = pydicom.dcmread(out / "patient7_seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.1" and seg.SeriesInstanceUID != first
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == first
    assert referenced == set(source_uids)
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert [segments[n].SegmentLabel for n in (1, 2)] == ["liver", "tumor"]
    liver_type, tumor_type = (segments[n].SegmentedPropertyTypeCodeSequence[0] for n in (1, 2))
    assert (liver_type.CodeValue, liver_type.CodingSchemeDesignator) == ("10200004", "SCT")
    assert (tumor_type.CodeValue, tumor_type.CodingSchemeDesignator) == ("108369006", "SCT")
    assert segments[2].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    expected = {1: np.isin(mask, (1, 2)), 2: mask == 2}
    frames = seg.pixel_array
    assert frames.shape[0] == 2 * len(source_uids)
    seen = set()
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        z = source_uids.index(uid)
        np.testing.assert_array_equal(frame.astype(bool), expected[number][:, :, z].T)
        seen.add((number, z))
    assert len(seen) == frames.shape[0]


def test_dicom_seg_written_only_for_dicom_inputs(tiny_phantoms, ckpt, tmp_path):
    scan = tiny_phantoms / "LiTS" / "volume-0.nii"
    assert main(["segment", str(scan), "--modality", "ct", "--ckpt", ckpt, "--out", str(tmp_path),
                 "--dicom-seg", *FAST]) == 0
    assert not list(tmp_path.glob("*.dcm"))
