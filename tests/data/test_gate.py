"""The input gate: one test per class of bad input, at the gate and through every verb that reads scans.

Every bad file is made here from a phantom the session wrote (``tiny_phantoms``); each refusal must be
exit code 2 with exactly one ``aqcf: error:`` line naming the file, no traceback, and the user's files
byte for byte unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from aqcf.cli import main
from aqcf.data import gate
from aqcf.data.cohorts import Case
from aqcf.data.dicom import read_dicom_series
from aqcf.errors import AqcfError
from tests.dicom_writer import write_ct_slice

NAN_VOXELS = 12  # the partly-NaN scan holds exactly this many NaN voxels


# --------------------------------------------------------------------------------------- helpers


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """A NIfTI file whose affine is exactly ``affine`` (sform only, so a degenerate one can be stored)."""
    image = nib.Nifti1Image(data, None)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def _digests(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("aqcf: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def phantom(tiny_phantoms):
    """``(image path, label path, image array, label array, affine)`` of phantom CT case 0."""
    image_path = tiny_phantoms / "LiTS" / "volume-0.nii"
    label_path = tiny_phantoms / "LiTS" / "segmentation-0.nii"
    image = nib.load(image_path)
    return image_path, label_path, np.asarray(image.dataobj), np.asarray(nib.load(label_path).dataobj), image.affine


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bad_image(kind: str, phantom, folder: Path, stem: str = "volume-0") -> tuple[Path, str]:
    """Write a scan broken in one way; returns its path and a fragment the error must hold."""
    source, _, array, _, affine = phantom
    nii = folder / f"{stem}.nii"
    if kind == "truncated-nii":
        shutil.copyfile(source, nii)
        return _truncate(nii), "truncated file"
    if kind == "truncated-nii-gz":
        path = folder / f"{stem}.nii.gz"
        path.write_bytes(gzip.compress(source.read_bytes()))
        return _truncate(path), "truncated or damaged file"
    if kind in ("all-nan", "all-inf"):
        value = np.nan if kind == "all-nan" else np.inf
        return _save(nii, np.full(array.shape, value, np.float32), affine), f"{array.size} non-finite voxels"
    if kind == "part-nan":
        data = array.astype(np.float32)
        flat = np.random.default_rng(0).choice(data.size, NAN_VOXELS, replace=False)
        np.put(data, flat, np.nan)
        return _save(nii, data, affine), f"{NAN_VOXELS} non-finite voxels"
    if kind == "2d":
        data = array[:, :, array.shape[2] // 2]
        return _save(nii, data, affine), f"2D image of shape {data.shape}; expected a 3D scan"
    if kind == "multichannel":
        data = np.stack([array] * 3, axis=-1)
        return _save(nii, data, affine), f"4D image of shape {data.shape} (3 volumes or channels); expected a 3D scan"
    if kind == "singular-affine":
        bad = affine.copy()
        bad[:3, 2] = bad[:3, 0]  # the third voxel axis along the first
        return _save(nii, array, bad), "the affine is singular"
    if kind == "zero-spacing":
        bad = affine.copy()
        bad[:3, 2] = 0.0
        return _save(nii, array, bad), "every size must be positive"
    raise ValueError(kind)


IMAGE_KINDS = ("truncated-nii", "truncated-nii-gz", "all-nan", "part-nan", "all-inf", "2d", "multichannel",
               "singular-affine", "zero-spacing")


def _bad_label(kind: str, phantom, folder: Path, stem: str = "segmentation-0") -> tuple[Path, str]:
    """Write a label map broken in one way (for the phantom's image); returns its path and an error fragment."""
    _, _, _, label, affine = phantom
    path = folder / f"{stem}.nii"
    data = label.astype(np.float32)
    if kind == "nan-label":
        data[0, 0, 0] = np.nan
        return _save(path, data, affine), "label values {nan} outside {0, 1, 2}"
    if kind == "fraction-label":
        data[label == 1] = 1.5
        return _save(path, data, affine), "label values {1.5} outside {0, 1, 2}"
    if kind == "label-3":
        data = label.astype(np.uint8)
        data[0, 0, 0] = 3
        return _save(path, data, affine), "label values {3} outside {0, 1, 2}"
    if kind == "grid-shape":
        data = label[:, :, :-1]
        return _save(path, data, affine), f"shape {data.shape} differs from its image's {label.shape}"
    if kind == "grid-affine":
        shifted = affine.copy()
        shifted[0, 3] += 1.0
        return _save(path, label, shifted), "affine differs from its image's"
    if kind == "truncated-label":
        return _truncate(_save(folder / f"{stem}.nii.gz", label, affine)), "truncated or damaged file"
    raise ValueError(kind)


LABEL_KINDS = ("nan-label", "fraction-label", "label-3", "grid-shape", "grid-affine", "truncated-label")


def _lits_cohort(phantom, folder: Path, image_kind: str | None = None, label_kind: str | None = None):
    """A one-case LiTS folder with the image or the label broken; returns ``(root, broken file, fragment)``."""
    source_image, source_label = phantom[0], phantom[1]
    root = folder / "LiTS"
    root.mkdir(parents=True)
    broken, fragment = None, None
    if image_kind:
        broken, fragment = _bad_image(image_kind, phantom, root)
    else:
        shutil.copyfile(source_image, root / "volume-0.nii")
    if label_kind:
        broken, fragment = _bad_label(label_kind, phantom, root)
    else:
        shutil.copyfile(source_label, root / "segmentation-0.nii")
    return root, broken, fragment


def _rgb_series(folder: Path, slices: int = 4) -> Path:
    """A colour secondary capture (RGB, three samples per pixel) as a folder of DICOM files."""
    series = generate_uid()
    pixels = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    for k in range(slices):
        path = folder / f"IM{k:04d}"
        write_ct_slice(path, pixels, spacing=(0.8, 0.8), instance=k + 1, bits=8, series_uid=series)
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.Modality = "OT"
        ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
        ds.PixelData = np.repeat(pixels[..., None], 3, axis=-1).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return folder


def _uneven_series(folder: Path, steps=(2.5, 2.5, 4.0, 2.5)) -> Path:
    """A CT series whose slices are 2.5 mm apart except one gap of 4 mm."""
    series = generate_uid()
    positions = np.concatenate([[0.0], np.cumsum(steps)])
    for k, z in enumerate(positions):
        pixels = np.full((12, 16), 1000 + k, np.uint16)
        write_ct_slice(folder / f"IM{k:04d}", pixels, spacing=(0.8, 0.8), position=(0.0, 0.0, float(z)),
                       instance=k + 1, intercept=-1024, series_uid=series)
    return folder


# ------------------------------------------------------------------------------------ the gate


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_load_volume_refuses_each_bad_scan(kind, phantom, tmp_path):
    path, fragment = _bad_image(kind, phantom, tmp_path)
    with pytest.raises(AqcfError) as info:
        gate.load_volume(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message


def test_a_header_reveals_a_short_nii_but_not_a_short_nii_gz(phantom, tmp_path):
    short, _ = _bad_image("truncated-nii", phantom, tmp_path)
    with pytest.raises(AqcfError, match="truncated file"):
        gate.read_header(short)
    short_gz, _ = _bad_image("truncated-nii-gz", phantom, tmp_path)
    assert gate.read_header(short_gz)[0] == phantom[2].shape  # gzip has no length up front
    with pytest.raises(AqcfError, match="truncated or damaged"):
        gate.load_volume(short_gz)


def test_the_gzip_checksum_is_verified(phantom, tmp_path):
    path = tmp_path / "volume-0.nii.gz"
    data = bytearray(gzip.compress(phantom[0].read_bytes()))
    data[-8] ^= 0xFF  # the CRC-32 of the trailer: every voxel still decompresses
    path.write_bytes(bytes(data))
    with pytest.raises(AqcfError, match="truncated or damaged file.*CRC"):
        gate.load_volume(path)


def test_a_complete_scan_is_read_as_stored(phantom, tmp_path):
    volume = gate.load_volume(phantom[0])
    np.testing.assert_array_equal(volume.array, phantom[2])
    assert volume.array.dtype == phantom[2].dtype
    np.testing.assert_array_equal(volume.affine, phantom[4])
    gz = tmp_path / "volume-0.nii.gz"
    gz.write_bytes(gzip.compress(phantom[0].read_bytes()))
    np.testing.assert_array_equal(gate.load_volume(gz).array, phantom[2])


def test_a_singleton_fourth_axis_is_one_volume(phantom, tmp_path):
    _, _, array, _, affine = phantom
    path = _save(tmp_path / "volume-0.nii.gz", array[..., None], affine)
    volume = gate.load_volume(path)
    assert volume.shape == (*array.shape, 1) and volume.array.shape == array.shape
    np.testing.assert_array_equal(volume.array, array)


def test_check_array_and_affine_on_loaded_data():
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    data = np.zeros((4, 5, 6), np.float32)
    assert gate.check_array("x.nii", data[..., None], affine).shape == (4, 5, 6)
    data[1, 2, 3], data[0, 0, 5] = np.nan, -np.inf
    assert gate.count_nonfinite(data) == 2
    with pytest.raises(AqcfError, match=r"^x\.nii: 2 non-finite voxels \(NaN or Inf\) of 120$"):
        gate.check_array("x.nii", data, affine)
    assert gate.check_array("x.nii", data, affine, finite=False).shape == (4, 5, 6)
    with pytest.raises(AqcfError, match="holds NaN or Inf"):
        gate.check_affine("x.nii", np.diag([0.8, np.nan, 2.5, 1.0]))
    with pytest.raises(AqcfError, match=r"voxel size \(0\.8, 0, 2\.5\) mm"):
        gate.check_affine("x.nii", np.diag([0.8, 0.0, 2.5, 1.0]))
    with pytest.raises(AqcfError, match=r"2D image of shape \(4, 5, 1\)"):
        gate.spatial_shape("x.nii", (4, 5, 1))


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_load_label_refuses_each_bad_label(kind, phantom, tmp_path):
    path, fragment = _bad_label(kind, phantom, tmp_path)
    grid = gate.read_header(phantom[0])
    with pytest.raises(AqcfError) as info:
        gate.load_label(path, grid, phantom[0])
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message


def test_load_label_accepts_float_storage_of_valid_labels(phantom, tmp_path):
    path = _save(tmp_path / "segmentation-0.nii", phantom[3].astype(np.float32), phantom[4])
    volume = gate.load_label(path, gate.read_header(phantom[0]), phantom[0])
    np.testing.assert_array_equal(volume.array, phantom[3])


def test_check_cases_lists_every_broken_case(phantom, tmp_path):
    cases = []
    for n in range(4):
        image, label = tmp_path / f"volume-{n}.nii", tmp_path / f"segmentation-{n}.nii"
        shutil.copyfile(phantom[0], image)
        shutil.copyfile(phantom[1], label)
        cases.append(Case(f"lits-{n}", "ct", image, label))
    _bad_image("part-nan", phantom, tmp_path, stem="volume-1")
    _bad_label("label-3", phantom, tmp_path, stem="segmentation-3")
    problems = gate.check_cases(cases)
    assert len(problems) == 2
    assert problems[0].startswith(f"{tmp_path / 'volume-1.nii'}: {NAN_VOXELS} non-finite voxels")
    assert problems[1].startswith(f"{tmp_path / 'segmentation-3.nii'}: label values {{3}}")
    assert gate.check_cases(cases, read_data=False) == []  # both need the voxels
    with pytest.raises(gate.CaseErrors) as info:
        gate.CaseErrors.raise_if_any(problems, total=len(cases))
    assert str(info.value) == f"2 of 4 cases refused: {problems[0]} | {problems[1]}"
    assert info.value.problems == problems
    copy = pickle.loads(pickle.dumps(info.value))  # as from a worker process
    assert copy.problems == problems and str(copy) == str(info.value)
    gate.CaseErrors.raise_if_any([], total=4)


def test_dicom_rgb_secondary_capture_is_refused(tmp_path):
    folder = _rgb_series(tmp_path / "sc")
    before = _digests(folder)
    with pytest.raises(AqcfError, match=r"IM0000: RGB image with 3 sample\(s\) per pixel; expected a monochrome"):
        read_dicom_series(folder)
    assert _digests(folder) == before


def test_dicom_uneven_slice_spacing_is_refused(tmp_path):
    folder = _uneven_series(tmp_path / "ct")
    with pytest.raises(AqcfError, match=r"ct: slice spacing is not uniform \(2\.500 to 4\.000 mm\)"):
        read_dicom_series(folder)
    even = _uneven_series(tmp_path / "even", steps=(2.5, 2.5, 2.5, 2.5))
    volume, affine = read_dicom_series(even)
    assert volume.shape == (16, 12, 5) and np.isclose(affine[2, 2], 2.5)


def test_dicom_slices_of_different_size_or_spacing_are_refused(tmp_path):
    folder = _uneven_series(tmp_path / "ct", steps=(2.5, 2.5))
    write_ct_slice(folder / "IM0009", np.zeros((12, 15), np.uint16), spacing=(0.8, 0.8), position=(0, 0, 7.5),
                   instance=4, series_uid=pydicom.dcmread(folder / "IM0000").SeriesInstanceUID)
    with pytest.raises(AqcfError, match=r"slices differ in size \(rows, columns\)"):
        read_dicom_series(folder)
    write_ct_slice(folder / "IM0009", np.zeros((12, 16), np.uint16), spacing=(0.8, 0.9), position=(0, 0, 7.5),
                   instance=4, series_uid=pydicom.dcmread(folder / "IM0000").SeriesInstanceUID)
    with pytest.raises(AqcfError, match="slices have different PixelSpacing"):
        read_dicom_series(folder)


# ------------------------------------------------------------------------------- through the verbs


@pytest.mark.parametrize("kind", [*IMAGE_KINDS, *LABEL_KINDS])
def test_preprocess_refuses(kind, phantom, tmp_path, capsys):
    image_kind, label_kind = (kind, None) if kind in IMAGE_KINDS else (None, kind)
    root, broken, fragment = _lits_cohort(phantom, tmp_path, image_kind, label_kind)
    before = _digests(root)
    code = main(["preprocess", "--data", str(root), "--format", "lits", "--modality", "ct",
                 "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert code == 2
    line = _one_error_line(capsys)
    assert str(broken) in line and fragment in line
    assert _digests(root) == before
    assert not list((tmp_path / "cache").rglob("manifest.json"))


def test_preprocess_accepts_a_singleton_fourth_axis(phantom, tmp_path, capsys):
    root = tmp_path / "LiTS"
    _save(root / "volume-0.nii", phantom[2][..., None], phantom[4])
    shutil.copyfile(phantom[1], root / "segmentation-0.nii")
    code = main(["preprocess", "--data", str(root), "--format", "lits", "--modality", "ct",
                 "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("kind", [*IMAGE_KINDS, *LABEL_KINDS])
def test_export_nnunet_refuses(kind, phantom, tmp_path, capsys):
    image_kind, label_kind = (kind, None) if kind in IMAGE_KINDS else (None, kind)
    root, broken, fragment = _lits_cohort(phantom, tmp_path, image_kind, label_kind)
    # nnU-Net data sets have one file ending: give the intact file the broken one's
    if broken.name.endswith(".gz"):
        for path in root.glob("*.nii"):
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
    before = _digests(root)
    out = tmp_path / "nnUNet_raw"
    code = main(["export-nnunet", str(root), "--format", "lits", "--modality", "ct", "--id", "7", "--name", "LiTS",
                 "--out", str(out)])
    assert code == 2
    line = _one_error_line(capsys)
    assert str(broken) in line and fragment in line
    assert _digests(root) == before
    assert not out.exists()


@pytest.mark.parametrize("kind", ["truncated-label", "nan-label", "fraction-label", "label-3"])
def test_evaluate_refuses_a_bad_prediction(kind, phantom, tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    ref.mkdir()
    pred.mkdir()
    shutil.copyfile(phantom[1], ref / "case.nii")
    broken, fragment = _bad_label(kind, phantom, pred, stem="case")
    before = _digests(tmp_path)
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "out"),
                 "--modality", "ct", "--no-progress"])
    assert code == 2
    line = _one_error_line(capsys)
    assert str(broken) in line and fragment in line
    assert _digests(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["2d", "multichannel", "singular-affine"])
def test_evaluate_refuses_a_bad_reference(kind, phantom, tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    shutil.copyfile(phantom[1], pred / "volume-0.nii")
    broken, fragment = _bad_image(kind, phantom, ref)
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "out"),
                 "--modality", "ct", "--no-progress"])
    assert code == 2
    line = _one_error_line(capsys)
    assert str(broken) in line and fragment in line


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return str(tiny_run / "checkpoints" / "best.ckpt")


@pytest.mark.parametrize("kind", [*IMAGE_KINDS, "rgb-dicom", "uneven-dicom"])
def test_segment_refuses(kind, phantom, ckpt, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    if kind == "rgb-dicom":
        source, fragment = _rgb_series(inputs / "sc"), "expected a monochrome scan"
        broken = source / "IM0000"
    elif kind == "uneven-dicom":
        source = broken = _uneven_series(inputs / "ct")
        fragment = "slice spacing is not uniform"
    else:
        broken, fragment = _bad_image(kind, phantom, inputs)
        source = broken
    before = _digests(inputs)
    out = tmp_path / "out"
    code = main(["segment", str(source), "--modality", "ct", "--ckpt", ckpt, "--out", str(out),
                 "--overlap", "0.25", "--no-progress"])
    assert code == 2
    line = _one_error_line(capsys)
    assert str(broken) in line and fragment in line
    assert _digests(inputs) == before
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kind", ["truncated-nii-gz", "label-3"])
def test_explain_refuses(kind, phantom, tiny_run, tmp_path, capsys):
    image_kind, label_kind = (kind, None) if kind in IMAGE_KINDS else (None, kind)
    root, broken, fragment = _lits_cohort(phantom, tmp_path, image_kind, label_kind)
    before = _digests(root)
    out = tmp_path / "out"
    code = main(["explain", "--ckpt", str(tiny_run / "checkpoints" / "best.ckpt"), "--out", str(out),
                 "--ct-data", str(root), "--cache", str(tmp_path / "cache"), "--no-gates", "--no-progress"])
    assert code == 2
    line = _one_error_line(capsys)
    assert str(broken) in line and fragment in line
    assert _digests(root) == before
    assert not out.exists() or not any(out.iterdir())


def test_preprocess_names_every_broken_case(phantom, tmp_path, capsys):
    root = tmp_path / "LiTS"
    root.mkdir()
    for n in range(3):
        shutil.copyfile(phantom[0], root / f"volume-{n}.nii")
        shutil.copyfile(phantom[1], root / f"segmentation-{n}.nii")
    truncated, _ = _bad_image("truncated-nii-gz", phantom, root, stem="volume-0")
    (root / "volume-0.nii").unlink()
    label, _ = _bad_label("label-3", phantom, root, stem="segmentation-2")
    code = main(["preprocess", "--data", str(root), "--format", "lits", "--modality", "ct",
                 "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert code == 2
    line = _one_error_line(capsys)
    assert str(truncated) in line and str(label) in line and "2 of 3 cases" in line
    assert not list((tmp_path / "cache").rglob("manifest.json"))
