"""``aqcf segment`` and ``aqcf predict`` end to end with the tiny checkpoint: geometry, measures, inputs, errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from aqcf.cli import main
from tests.dicom_writer import write_ct_slice

REPO = Path(__file__).resolve().parents[2]
FAST = ["--overlap", "0.25", "--no-progress"]
HU_FLOOR = -1024  # stored DICOM values are HU + 1024, unsigned


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return str(tiny_run / "checkpoints" / "best.ckpt")


def _phantom_ct(tiny_phantoms, n=0):
    return np.asarray(nib.load(tiny_phantoms / "LiTS" / f"volume-{n}.nii").dataobj).astype(np.int16)


def _oblique_affine():
    """Flipped left-right, rotated 25 degrees about the A-P axis, anisotropic 1.6 x 2.2 x 3.4 mm."""
    c, s = math.cos(math.radians(25)), math.sin(math.radians(25))
    rotation = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.0, 1.0, 1.0]) @ np.diag([1.6, 2.2, 3.4])
    affine[:3, 3] = [30.0, -50.0, 12.0]
    return affine


def _save(path, data, affine):
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def _brute_force_feret(mask, affine):
    """Largest distance between the corners of any two voxels of ``mask``, in mm (no hull)."""
    voxels = np.argwhere(mask)
    offsets = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])
    corners = np.unique((voxels[:, None] + offsets[None]).reshape(-1, 3), axis=0)
    points = corners @ affine[:3, :3].T
    return max(cdist(points[i : i + 1000], points).max() for i in range(0, len(points), 1000))


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("aqcf: error: ")
    return lines[0]


def test_geometry_round_trip_and_measures(tiny_phantoms, ckpt, tmp_path):
    affine = _oblique_affine()
    scan = _save(tmp_path / "in" / "oblique.nii.gz", _phantom_ct(tiny_phantoms), affine)
    out = tmp_path / "out"
    assert main(["segment", str(scan), "--modality", "ct", "--ckpt", ckpt, "--out", str(out), *FAST]) == 0

    mask_image = nib.load(out / "oblique_seg.nii.gz")
    mask = np.asarray(mask_image.dataobj)
    assert mask.shape == nib.load(scan).shape and mask_image.get_data_dtype() == np.uint8
    assert np.allclose(mask_image.affine, affine)
    assert mask_image.header.get_qform(coded=True)[1] == 1 and mask_image.header.get_sform(coded=True)[1] == 1
    assert set(np.unique(mask)) <= {0, 1, 2}

    measures = json.loads((out / "oblique_seg.json").read_text())
    voxel_ml = 1.6 * 2.2 * 3.4 / 1000
    assert measures["liver_volume_ml"] == pytest.approx(np.count_nonzero(mask >= 1) * voxel_ml)
    assert measures["tumor_volume_ml"] == pytest.approx(np.count_nonzero(mask == 2) * voxel_ml)
    components, count = ndimage.label(mask == 2, structure=np.ones((3, 3, 3)))
    assert measures["tumor_count"] == count and len(measures["tumors"]) == count
    if count:
        largest = max(_brute_force_feret(components == i, affine) for i in range(1, count + 1))
        assert measures["largest_tumor_diameter_mm"] == pytest.approx(largest)
        assert measures["largest_tumor_axial_diameter_mm"] <= largest + 1e-9
    assert measures["shape"] == list(mask.shape) and measures["modality"] == "ct"
    assert measures["inference"]["overlap"] == 0.25 and measures["inference"]["window"] == [32, 32, 16]


def test_folder_input_png_and_overwrite(tiny_phantoms, ckpt, tmp_path, capsys):
    folder = tmp_path / "scans"
    for n in (2, 10):  # named so that natural order differs from text order
        source = nib.load(tiny_phantoms / "LiTS" / f"volume-{n % 6}.nii")
        _save(folder / f"case{n}.nii", np.asarray(source.dataobj), source.affine)
    out = tmp_path / "out"
    args = ["segment", str(folder), "--modality", "ct", "--ckpt", ckpt, "--out", str(out), "--png", *FAST]
    assert main(args) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line.split(":")[0] for line in printed] == ["case2", "case10"]
    for name in ("case2", "case10"):
        assert nib.load(out / f"{name}_seg.nii.gz").shape == nib.load(folder / f"{name}.nii").shape
        assert mpimg.imread(out / f"{name}_seg.png").ndim == 3

    mask = out / "case2_seg.nii.gz"
    stamp = mask.stat().st_mtime_ns
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert str(out / "case2_seg.nii.gz") in line and "--overwrite" in line
    assert mask.stat().st_mtime_ns == stamp
    assert main([*args, "--overwrite"]) == 0
    assert mask.stat().st_mtime_ns != stamp


def test_dicom_series_input(tiny_phantoms, ckpt, tmp_path):
    hu = np.maximum(_phantom_ct(tiny_phantoms, 1)[:, 4:44, :], HU_FLOOR)  # (x = columns 48, y = rows 40, z 24)
    row_spacing, column_spacing, step = 1.9, 2.1, 3.0
    origin = np.array([-60.0, -45.0, 100.0])  # LPS of the lowest slice's first pixel
    series = tmp_path / "series" / "patient7"
    order = list(range(hu.shape[2]))
    random.Random(0).shuffle(order)  # file names say nothing about slice order
    for k, z in enumerate(order):
        stored = (hu[:, :, z].T.astype(np.int32) - HU_FLOOR).astype(np.uint16)  # (rows, columns)
        write_ct_slice(series / f"IM{k:04d}", stored, spacing=(row_spacing, column_spacing),
                       position=origin + [0, 0, z * step], intercept=HU_FLOOR, series_uid="1.2.3.4")
    (series / "notes.txt").write_text("not DICOM, ignored")
    # the same voxels as NIfTI: LPS -> RAS negates x and y
    expected_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.array(
        [[column_spacing, 0, 0, origin[0]], [0, row_spacing, 0, origin[1]], [0, 0, step, origin[2]], [0, 0, 0, 1]]
    )
    nifti = _save(tmp_path / "nifti" / "patient7.nii.gz", hu, expected_affine)

    out_dicom, out_nifti = tmp_path / "out_dicom", tmp_path / "out_nifti"
    for source, out in ((series, out_dicom), (nifti, out_nifti)):
        assert main(["segment", str(source), "--modality", "ct", "--ckpt", ckpt, "--out", str(out), *FAST]) == 0
    from_dicom = nib.load(out_dicom / "patient7_seg.nii.gz")
    assert from_dicom.shape == hu.shape
    assert np.allclose(from_dicom.affine, expected_affine, atol=1e-4)
    np.testing.assert_array_equal(
        np.asarray(from_dicom.dataobj), np.asarray(nib.load(out_nifti / "patient7_seg.nii.gz").dataobj)
    )
    assert json.loads((out_dicom / "patient7_seg.json").read_text())["input_kind"] == "dicom"


def test_one_volume_of_a_4d_image_keeps_its_shape(tiny_phantoms, ckpt, tmp_path):
    source = nib.load(tiny_phantoms / "LiTS" / "volume-3.nii")
    data = np.asarray(source.dataobj)
    plain = _save(tmp_path / "in3d" / "scan.nii.gz", data, source.affine)
    four_d = _save(tmp_path / "in4d" / "scan.nii.gz", data[..., None], source.affine)  # (X, Y, Z, 1)
    for scan, out in ((plain, tmp_path / "out3d"), (four_d, tmp_path / "out4d")):
        assert main(["segment", str(scan), "--modality", "ct", "--ckpt", ckpt, "--out", str(out), "--png", *FAST]) == 0
    mask_3d, mask_4d = (nib.load(tmp_path / out / "scan_seg.nii.gz") for out in ("out3d", "out4d"))
    assert mask_4d.shape == (*data.shape, 1) and mask_3d.shape == data.shape
    np.testing.assert_array_equal(np.asarray(mask_4d.dataobj)[..., 0], np.asarray(mask_3d.dataobj))
    assert np.asarray(mask_3d.dataobj).any()  # the comparison is not between two empty masks
    np.testing.assert_allclose(mask_4d.affine, source.affine)


def test_errors_are_one_line(tiny_phantoms, ckpt, tmp_path, capsys):
    scan = str(tiny_phantoms / "LiTS" / "volume-0.nii")
    out = str(tmp_path / "out")
    missing = str(tmp_path / "nowhere" / "best.ckpt")
    assert main(["segment", scan, "--modality", "ct", "--ckpt", missing, "--out", out, *FAST]) == 2
    assert f"{missing}: checkpoint not found" in _one_error_line(capsys)

    with pytest.raises(SystemExit) as exit_info:
        main(["segment", scan, "--modality", "pet", "--ckpt", ckpt, "--out", out])
    assert exit_info.value.code == 2
    assert "--modality" in _one_error_line(capsys)

    import torch

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint["datamodule_hyper_parameters"]["ct_root"] = None  # an MRI-only run
    mri_only = tmp_path / "mri_only.ckpt"
    torch.save(checkpoint, mri_only)
    assert main(["segment", scan, "--modality", "ct", "--ckpt", str(mri_only), "--out", out, *FAST]) == 2
    assert "trained on MRI only; it cannot segment CT" in _one_error_line(capsys)

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    assert main(["segment", str(broken), "--modality", "ct", "--ckpt", ckpt, "--out", out, *FAST]) == 2
    assert str(broken) in _one_error_line(capsys)

    assert main(["segment", str(tmp_path / "absent.nii"), "--modality", "ct", "--ckpt", ckpt, "--out", out]) == 2
    assert "no such file or folder" in _one_error_line(capsys)
    assert not Path(out).exists()


def test_predict_writes_masks_for_the_configured_cases(tiny_phantoms, tiny_run, tmp_path):
    root = tmp_path / "run"
    args = [
        "predict",
        "--config", str(REPO / "configs" / "lits_atlas.yaml"),
        "--config", str(REPO / "tests" / "configs" / "tiny_cpu.yaml"),
        "--data.ct_root", str(tiny_phantoms / "LiTS"),
        "--data.mri_root", str(tiny_phantoms / "ATLAS"),
        "--data.cache_dir", str(tiny_phantoms / "cache"),
        "--trainer.default_root_dir", str(root),
        "--ckpt_path", str(tiny_run / "checkpoints" / "best.ckpt"),
    ]
    assert main(args) == 0
    sources = {}
    for modality in ("ct", "mri"):
        folds = json.loads((tiny_phantoms / "cache" / modality / "splits.json").read_text())
        for case in folds[0]["val"]:
            number = case.split("-")[1]
            name = f"volume-{number}.nii" if modality == "ct" else f"imagesTr/im{number}.nii.gz"
            sources[case] = tiny_phantoms / ("LiTS" if modality == "ct" else "ATLAS") / name
    written = sorted(p.name for p in (root / "predictions").glob("*.nii.gz"))
    assert written == sorted(f"{case}.nii.gz" for case in sources)
    for case, source in sources.items():
        mask, scan = nib.load(root / "predictions" / f"{case}.nii.gz"), nib.load(source)
        assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
        labels = np.asarray(mask.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2}
        measures = json.loads((root / "predictions" / f"{case}.json").read_text())
        voxel_ml = abs(np.linalg.det(scan.affine[:3, :3])) / 1000
        assert measures["liver_volume_ml"] == pytest.approx(np.count_nonzero(labels >= 1) * voxel_ml)


def test_onnxruntime_backend_gives_the_torch_backends_mask(tiny_phantoms, ckpt, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tmp_path / "ct.onnx"
    assert main(["export", "--ckpt", ckpt, "--format", "onnx", "--modality", "ct", "--out", str(model),
                 "--no-check"]) == 0
    scan = tiny_phantoms / "LiTS" / "volume-2.nii"
    assert main(["segment", str(scan), "--modality", "ct", "--ckpt", ckpt, "--out", str(tmp_path / "torch"),
                 *FAST]) == 0
    assert main(["segment", str(scan), "--modality", "ct", "--backend", "onnxruntime", "--onnx", str(model),
                 "--out", str(tmp_path / "onnx"), *FAST]) == 0
    torch_mask = np.asarray(nib.load(tmp_path / "torch" / "volume-2_seg.nii.gz").dataobj)
    onnx_mask = np.asarray(nib.load(tmp_path / "onnx" / "volume-2_seg.nii.gz").dataobj)
    assert (torch_mask > 0).any()
    np.testing.assert_array_equal(onnx_mask, torch_mask)
    record = json.loads((tmp_path / "onnx" / "volume-2_seg.json").read_text())
    assert record["inference"]["checkpoint"] == str(model)
    # the exported graph serves its one modality; a checkpoint beside --onnx is refused
    capsys.readouterr()
    assert main(["segment", str(scan), "--modality", "mri", "--backend", "onnxruntime", "--onnx", str(model),
                 "--out", str(tmp_path / "mri"), *FAST]) == 2
    assert "trained on CT only" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as info:
        main(["segment", str(scan), "--modality", "ct", "--backend", "onnxruntime", "--onnx", str(model),
              "--ckpt", ckpt, "--out", str(tmp_path / "both"), *FAST])
    assert info.value.code == 2
    assert "--backend onnxruntime needs --onnx (and no --ckpt" in _one_error_line(capsys)
