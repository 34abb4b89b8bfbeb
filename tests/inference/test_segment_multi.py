"""``aqcf segment`` with several ``--modality``: co-registered CT and MRI of one patient on different grids."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from aqcf.cli import main
from aqcf.data.phantoms import read_paired
from aqcf.data.preprocess import restore_to_original
from aqcf.inference.multimodal import preprocess_present
from aqcf.inference.predictor import Predictor

FAST = ["--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return str(tiny_run / "checkpoints" / "best.ckpt")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """One paired phantom: CT 2x2x3 mm and MRI 1.8x1.8x3.6 mm, world-aligned on different grids."""
    out = tmp_path_factory.mktemp("paired")
    assert main(["synth", "--out", str(out), "--n-ct", "0", "--n-mri", "0", "--paired", "1", "--shape", "48", "48",
                 "24", "--seed", "3", "--overwrite"]) == 0
    (case,) = read_paired(out / "Paired")
    case = {key: str(value) for key, value in case.items()}
    ct, mri = nib.load(case["ct_image"]), nib.load(case["mri_image"])
    assert ct.shape != mri.shape or not np.allclose(ct.affine, mri.affine)  # two grids
    return case


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("aqcf: error: ")
    return lines[0]


def _joint_logits(predictor: Predictor, ct: torch.Tensor, mri: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``network(ct, mri)`` (the joint training graph) through MONAI's sliding window, written independently."""
    window = predictor.window

    def both(x):
        return torch.cat(predictor.network(x[:, :1], x[:, 1:2]), dim=1)

    with torch.inference_mode():
        logits = sliding_window_inference(torch.cat([ct, mri])[None].float(), roi_size=window.roi_size,
                                          sw_batch_size=window.batch_size, predictor=both, overlap=window.overlap,
                                          mode=window.mode)
    classes = logits.shape[1] // 2
    return logits[:, :classes], logits[:, classes:]


def test_one_mask_per_modality_on_its_own_grid(ckpt, pair, tmp_path):
    out = tmp_path / "out"
    argv = ["segment", pair["ct_image"], pair["mri_image"], "--modality", "ct", "--modality", "mri", "--ckpt", ckpt,
            "-o", str(out), *FAST]
    assert main(argv) == 0
    stem = Path(pair["ct_image"]).name[: -len(".nii.gz")]
    for modality, source in (("ct", pair["ct_image"]), ("mri", pair["mri_image"])):
        scan, mask = nib.load(source), nib.load(out / f"{stem}_{modality}_seg.nii.gz")
        assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
        record = json.loads((out / f"{stem}_{modality}_seg.json").read_text())
        assert record["modality"] == modality and record["grid"] == "ct" and record["input"] == source
        assert record["shape"] == list(scan.shape) and "liver_volume_ml" in json.dumps(record)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}_{m}_seg.{ext}" for m in ("ct", "mri") for ext in ("nii.gz", "json"))


def test_mri_resampled_onto_the_ct_grid_in_world_coordinates(ckpt, pair):
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    images, records = preprocess_present({"ct": pair["ct_image"], "mri": pair["mri_image"]}, predictor)
    grid = np.asarray(records["ct"]["preprocessed_affine"])
    assert images["mri"].shape == images["ct"].shape
    # independently: each preprocessed voxel's world point in the MRI's voxel indices, linear, MRI window
    mri = nib.load(pair["mri_image"])
    ijk = np.indices(images["ct"].shape[1:]).reshape(3, -1)
    world = grid[:3, :3] @ ijk + grid[:3, 3:]
    index = np.linalg.inv(mri.affine)[:3, :3] @ world + np.linalg.inv(mri.affine)[:3, 3:]
    inside = np.all((index >= 0) & (index <= np.array(mri.shape)[:, None] - 1), axis=0)
    values = ndimage.map_coordinates(np.asarray(mri.dataobj, dtype=np.float64), index, order=1)
    low, high = predictor.preprocessing["mri"].window
    expected = np.clip((values - low) / (high - low), 0, 1)
    assert inside.mean() > 0.3
    assert np.allclose(images["mri"].numpy().reshape(-1)[inside], expected[inside], atol=1e-4)
    # the other stream's labels go back to its own scan: the record maps the common grid onto the MRI's
    assert records["mri"]["original_shape"] == list(mri.shape)


def test_equals_the_joint_graph_and_the_second_image_matters(ckpt, pair, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", pair["ct_image"], pair["mri_image"], "--modality", "ct", "--modality", "mri", "--ckpt",
                 ckpt, "-o", str(out), *FAST]) == 0
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    images, records = preprocess_present({"ct": pair["ct_image"], "mri": pair["mri_image"]}, predictor)
    ct_logits, mri_logits = _joint_logits(predictor, images["ct"], images["mri"])
    present = predictor.logits_present(images, outputs=["ct", "mri"])
    assert torch.allclose(present["ct"], ct_logits, atol=1e-5) and torch.allclose(present["mri"], mri_logits, atol=1e-5)
    stem = Path(pair["ct_image"]).name[: -len(".nii.gz")]
    for modality, logits in (("ct", ct_logits), ("mri", mri_logits)):
        expected = restore_to_original(logits[0].argmax(0).numpy(), records[modality])
        written = np.asarray(nib.load(out / f"{stem}_{modality}_seg.nii.gz").dataobj)
        assert np.array_equal(written, expected)
    # the CT stream alone (MRI zero-filled) gives other logits: the MRI image reaches the CT output
    alone = predictor.logits_present({"ct": images["ct"]}, outputs=["ct"])["ct"]
    assert (alone - ct_logits).abs().max() > 1e-4


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["{ct}", "--modality", "ct", "--modality", "mri"], "need exactly one input each"),
        (["{ct}", "{mri}", "{ct}", "--modality", "ct", "--modality", "mri"], "need exactly one input each"),
        (["{ct}", "{mri}", "--modality", "ct", "--modality", "CT"], "given twice"),
        (["{ct}", "{mri}", "--modality", "ct", "--modality", "pet"], "was trained on ct, mri"),
        (["{ct}", "{mri}", "--modality", "ct", "--modality", "mri", "--tta"], "--tta is not supported"),
    ],
)
def test_bad_uses_give_one_line(ckpt, pair, tmp_path, capsys, extra, expected):
    argv = [a.format(ct=pair["ct_image"], mri=pair["mri_image"]) for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", *argv, "--ckpt", ckpt, "-o", str(tmp_path / "out"), *FAST])
    assert exit_info.value.code == 2
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()
