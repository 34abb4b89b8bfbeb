"""aqcf segment: fold ensembles, --continue, --save-probabilities, -i/-o, --postprocess largest-liver."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from aqcf.cli import main

FAST = ["--overlap", "0.25", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return str(tiny_run / "checkpoints" / "best.ckpt")


@pytest.fixture(scope="module")
def other_ckpt(ckpt, tmp_path_factory):
    """A copy of the tiny checkpoint with perturbed weights: another model, the same settings."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(7)
    for key, value in checkpoint["state_dict"].items():
        if value.is_floating_point() and value.numel() > 1:
            checkpoint["state_dict"][key] = value + 0.5 * value.std() * torch.randn(value.shape, generator=generator)
    path = tmp_path_factory.mktemp("other") / "other.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def _scan(tiny_phantoms, n=0) -> Path:
    return tiny_phantoms / "LiTS" / f"volume-{n}.nii"


def _mask(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _model_probabilities(ckpt_path, scan) -> tuple[np.ndarray, dict]:
    """One model's softmax on the preprocessed grid, with a plain MONAI call over its network."""
    from monai.inferers import sliding_window_inference

    from aqcf.data.datamodule import preprocess_settings_from_hparams
    from aqcf.data.preprocess import preprocess_image
    from aqcf.models.segmentation import SegmentationModule

    module = SegmentationModule.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    data = torch.load(ckpt_path, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    image, record = preprocess_image(scan, preprocess_settings_from_hparams(data, "ct"))
    with torch.no_grad():
        logits = sliding_window_inference(
            image[None].float(), module.patch_size, module.sw_batch_size,
            lambda x: module.network.forward_single(x, "ct"), overlap=0.25, mode=module.sw_mode,
        )
    return torch.softmax(logits[0], dim=0).numpy(), record


def test_two_identical_checkpoints_give_one_models_mask(tiny_phantoms, ckpt, tmp_path):
    twin = tmp_path / "twin.ckpt"
    shutil.copy(ckpt, twin)
    scan = _scan(tiny_phantoms)
    assert main(["segment", str(scan), "--modality", "ct", "--ckpt", ckpt, "--out", str(tmp_path / "one"), *FAST]) == 0
    assert main(["segment", "-i", str(scan), "--modality", "ct", "--ckpt", ckpt, str(twin),
                 "-o", str(tmp_path / "two"), *FAST]) == 0
    np.testing.assert_array_equal(_mask(tmp_path / "one" / "volume-0_seg.nii.gz"),
                                  _mask(tmp_path / "two" / "volume-0_seg.nii.gz"))


def test_ensemble_is_the_argmax_of_the_mean_softmax(tiny_phantoms, ckpt, other_ckpt, tmp_path):
    from aqcf.data.preprocess import restore_to_original

    scan = _scan(tiny_phantoms, 1)
    first, record = _model_probabilities(ckpt, scan)
    second, _ = _model_probabilities(other_ckpt, scan)
    expected = restore_to_original(((first + second) / 2).argmax(axis=0), record)
    alone = [restore_to_original(p.argmax(axis=0), record) for p in (first, second)]
    assert not np.array_equal(alone[0], alone[1])  # the models differ, so the test can fail
    assert main(["segment", str(scan), "--modality", "ct", "--ckpt", ckpt, other_ckpt,
                 "--out", str(tmp_path / "ens"), "--save-probabilities", *FAST]) == 0
    mask = _mask(tmp_path / "ens" / "volume-1_seg.nii.gz")
    np.testing.assert_array_equal(mask, expected)
    stored = np.load(tmp_path / "ens" / "volume-1_seg_probabilities.npz")["probabilities"]
    assert stored.dtype == np.float16 and stored.shape == (3, *mask.shape)
    np.testing.assert_allclose(stored.astype(np.float32).sum(axis=0), 1.0, atol=3e-3)


def test_run_folder_gives_its_fold_checkpoints(ckpt, other_ckpt, tmp_path):
    from aqcf.inference.ensemble import checkpoint_paths

    for fold, source in ((1, other_ckpt), (0, ckpt)):
        target = tmp_path / "run" / f"fold{fold}" / "checkpoints" / "best.ckpt"
        target.parent.mkdir(parents=True)
        shutil.copy(source, target)
    assert [p.parts[-3] for p in checkpoint_paths([tmp_path / "run"])] == ["fold0", "fold1"]


def test_checkpoints_that_disagree_are_one_error_line(tiny_phantoms, ckpt, tmp_path, capsys):
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint["datamodule_hyper_parameters"]["ct_window"] = [-100.0, 200.0]
    odd = tmp_path / "odd.ckpt"
    torch.save(checkpoint, odd)
    code = main(["segment", str(_scan(tiny_phantoms)), "--modality", "ct", "--ckpt", ckpt, str(odd),
                 "--out", str(tmp_path / "out"), *FAST])
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"aqcf: error: {odd}: ct preprocessing window is (-100.0, 200.0)")
    assert not (tmp_path / "out" / "volume-0_seg.nii.gz").exists()


def test_probabilities_sum_to_one_and_their_argmax_is_the_mask(tiny_phantoms, ckpt, tmp_path):
    assert main(["segment", str(_scan(tiny_phantoms, 2)), "--modality", "ct", "--ckpt", ckpt,
                 "--out", str(tmp_path), "--save-probabilities", *FAST]) == 0
    mask = _mask(tmp_path / "volume-2_seg.nii.gz")
    with np.load(tmp_path / "volume-2_seg_probabilities.npz") as stored:
        probabilities = stored["probabilities"].astype(np.float32)
    assert probabilities.shape == (3, *mask.shape)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=3e-3)  # float16 rounding of each channel
    # the mask's label holds the largest probability everywhere; float16 may round a near-tie to a tie
    chosen = np.take_along_axis(probabilities, mask[None].astype(np.int64), axis=0)[0]
    np.testing.assert_array_equal(chosen, probabilities.max(axis=0))
    assert (probabilities.argmax(axis=0) == mask).mean() > 0.999
    assert set(np.unique(mask)) >= {0, 1}  # not a trivial all-background case


def test_continue_skips_complete_outputs_and_redoes_a_truncated_one(tiny_phantoms, ckpt, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    for n in (0, 1):
        shutil.copy(_scan(tiny_phantoms, n), scans / f"volume-{n}.nii")
    out = tmp_path / "out"
    assert main(["segment", str(scans), "--modality", "ct", "--ckpt", ckpt, "--out", str(out), *FAST]) == 0
    complete, truncated = out / "volume-0_seg.nii.gz", out / "volume-1_seg.nii.gz"
    reference = _mask(truncated)
    old = 1_000_000_000
    for path in out.iterdir():
        os.utime(path, (old, old))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    os.utime(truncated, (old, old))
    capsys.readouterr()
    assert main(["segment", str(scans), "--modality", "ct", "--ckpt", ckpt, "--out", str(out), "--continue",
                 *FAST]) == 0
    assert "volume-0: complete, skipped (--continue)" in capsys.readouterr().out
    assert complete.stat().st_mtime == old and (out / "volume-0_seg.json").stat().st_mtime == old
    assert truncated.stat().st_mtime != old
    np.testing.assert_array_equal(_mask(truncated), reference)
    # without --continue the existing outputs are still refused
    assert main(["segment", str(scans), "--modality", "ct", "--ckpt", ckpt, "--out", str(out), *FAST]) == 2


def test_continue_redoes_a_scan_whose_json_is_damaged(tiny_phantoms, ckpt, tmp_path):
    scan = _scan(tiny_phantoms)
    args = ["segment", str(scan), "--modality", "ct", "--ckpt", ckpt, "--out", str(tmp_path), *FAST]
    assert main(args) == 0
    (tmp_path / "volume-0_seg.json").write_text('{"liver_volume_ml": ')
    assert main([*args, "--continue"]) == 0
    import json

    assert "liver_volume_ml" in json.loads((tmp_path / "volume-0_seg.json").read_text())


def test_largest_liver_keeps_one_component_and_its_tumors():
    from aqcf.inference.postprocess import keep_largest_liver

    labels = np.zeros((12, 10, 8), np.uint8)
    labels[1:6, 1:6, 1:6] = 1            # the liver: 125 voxels
    labels[2:4, 2:4, 2:4] = 2            # a tumor inside it
    labels[5, 5, 5] = 2                  # tumor at its border, still part of it
    labels[6, 6, 6] = 1                  # touches the liver by a corner: 26-connected, kept
    labels[8:11, 1:4, 1:4] = 1           # a second, smaller "liver" (27 voxels): dropped
    labels[9, 2, 2] = 2                  # with a tumor inside: dropped
    labels[10, 8, 6] = 2                 # a lone tumor outside any liver: dropped
    expected = labels.copy()
    expected[8:11, 1:4, 1:4] = 0
    expected[10, 8, 6] = 0
    result = keep_largest_liver(labels)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, expected)
    assert keep_largest_liver(np.zeros((4, 4, 4), np.uint8)).sum() == 0


def test_postprocess_option_changes_only_what_it_should(tiny_phantoms, ckpt, tmp_path):
    from scipy import ndimage

    scan = _scan(tiny_phantoms, 3)
    for name, extra in (("plain", []), ("post", ["--postprocess", "largest-liver"])):
        assert main(["segment", str(scan), "--modality", "ct", "--ckpt", ckpt, "--out", str(tmp_path / name),
                     *extra, *FAST]) == 0
    plain, post = _mask(tmp_path / "plain" / "volume-3_seg.nii.gz"), _mask(tmp_path / "post" / "volume-3_seg.nii.gz")
    _, count = ndimage.label(post > 0, structure=np.ones((3, 3, 3)))
    assert count <= 1
    kept = post > 0
    np.testing.assert_array_equal(post[kept], plain[kept])  # nothing relabelled, only removed
