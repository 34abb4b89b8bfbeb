"""Predictor: settings rebuilt from a checkpoint, the deployed path against MONAI and the validation path, TTA."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from aqcf.errors import AqcfError
from aqcf.inference.predictor import Predictor
from aqcf.networks.sliding_window import WindowSettings, flip_averaged, sliding_window_logits

TINY_CONFIG = Path(__file__).parents[1] / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return tiny_run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor.from_checkpoint(ckpt, device="cpu")


@pytest.fixture(scope="module")
def ct_image(predictor, tiny_phantoms):
    from aqcf.data.preprocess import preprocess_image

    image, _ = preprocess_image(tiny_phantoms / "LiTS" / "volume-0.nii", predictor.preprocessing["ct"])
    return image


def test_settings_come_from_the_checkpoint(predictor):
    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    assert predictor.window.roi_size == tuple(tiny["data"]["patch_size"])
    assert predictor.window.overlap == tiny["model"]["sw_overlap"]
    assert predictor.window.batch_size == tiny["model"]["sw_batch_size"]
    assert predictor.window.mode == "gaussian"  # configs/lits_atlas.yaml
    assert predictor.modalities == ("ct", "mri")
    ct, mri = predictor.preprocessing["ct"], predictor.preprocessing["mri"]
    assert ct.spacing == tuple(tiny["data"]["ct_spacing"]) and mri.spacing == tuple(tiny["data"]["mri_spacing"])
    # the paper's windows and orientations (section 3.1.2), untouched by the tiny config
    assert ct.window == (-16.0, 176.0) and mri.window == (74.0, 511.0)
    assert (ct.orientation, mri.orientation) == ("RAS", "LAS")


def test_overrides(ckpt):
    p = Predictor.from_checkpoint(ckpt, device="cpu", overlap=0.5, batch_size=3, mode="constant", roi_size=(48, 32, 16))
    assert p.window == WindowSettings((48, 32, 16), 0.5, 3, "constant", False)
    with pytest.raises(AqcfError, match="divisible by 16"):
        Predictor.from_checkpoint(ckpt, device="cpu", roi_size=(40, 32, 16))
    with pytest.raises(AqcfError, match="overlap"):
        Predictor.from_checkpoint(ckpt, device="cpu", overlap=1.0)


def test_unimodal_path_equals_zero_filled_dual_graph(predictor, ct_image):
    """Eq. 17: the deployed path equals MONAI's sliding window over net(x, zeros)[0], the full graph."""
    from monai.inferers import sliding_window_inference

    window = predictor.window
    net = predictor.network
    with torch.inference_mode():
        ours = sliding_window_logits(net, ct_image[None], "ct", window)
        plain = sliding_window_inference(
            ct_image[None], window.roi_size, window.batch_size, lambda x: net(x, torch.zeros_like(x))[0],
            overlap=window.overlap, mode=window.mode,
        )
    assert ours.shape == (1, 3, *ct_image.shape[1:])
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)
    assert torch.equal(predictor.labels_on_grid(ct_image, "ct"), plain.argmax(1)[0].to(torch.uint8))


def test_same_labels_as_the_validation_path(ckpt, predictor, ct_image):
    from aqcf.models.segmentation import SegmentationModule

    module = SegmentationModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    with torch.inference_mode():
        validation = module.predict_volume(ct_image[None], "ct").argmax(1)[0]
    assert torch.equal(predictor.labels_on_grid(ct_image, "ct"), validation.to(torch.uint8))
    stitched_on_cpu = predictor.with_window(stitch_on_cpu=True)
    assert torch.equal(stitched_on_cpu.labels_on_grid(ct_image, "ct"), validation.to(torch.uint8))


def test_flip_averaging():
    # a position-dependent predictor: the average over the 8 mirrorings of X, Y, Z is computed by hand
    ramp = torch.arange(4.0).view(1, 1, 4, 1, 1) * torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 1, 3, 1)
    ramp = ramp.expand(1, 1, 4, 3, 2)
    x = torch.rand(1, 1, 4, 3, 2)
    averaged = flip_averaged(lambda v: v * 2 + ramp)(x)
    expected = torch.zeros_like(x)
    for flips in itertools.product((False, True), repeat=3):
        dims = [d for d, f in zip((2, 3, 4), flips, strict=True) if f]
        expected += 2 * x + (ramp.flip(dims) if dims else ramp)
    torch.testing.assert_close(averaged, expected / 8)


def test_tta_labels_on_grid(predictor, ct_image):
    labels = predictor.labels_on_grid(ct_image, "ct")
    tta = Predictor(predictor.network, predictor.preprocessing, predictor.window, "cpu", tta=True)
    with_tta = tta.labels_on_grid(ct_image, "ct")
    assert with_tta.shape == labels.shape and with_tta.dtype == torch.uint8
    assert set(np.unique(with_tta.numpy())) <= {0, 1, 2}


def test_segment_file_returns_the_scan_grid(predictor, tiny_phantoms):
    import nibabel as nib

    path = tiny_phantoms / "ATLAS" / "imagesTr" / "im0.nii.gz"
    result = predictor.segment_file(path, "mri")
    assert result.labels.shape == nib.load(path).shape and result.labels.dtype == np.uint8
    assert set(result.seconds) == {"preprocess", "inference", "restore"}


def test_checkpoint_errors(ckpt, tmp_path):
    with pytest.raises(AqcfError, match="checkpoint not found"):
        Predictor.from_checkpoint(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(AqcfError, match="not a readable checkpoint"):
        Predictor.from_checkpoint(junk)
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}}, bare)
    with pytest.raises(AqcfError, match="hyper_parameters"):
        Predictor.from_checkpoint(bare)


def test_untrained_modality_is_refused(ckpt, tmp_path):
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint["datamodule_hyper_parameters"]["mri_root"] = None  # as a CT-only run records it
    ct_only = tmp_path / "ct_only.ckpt"
    torch.save(checkpoint, ct_only)
    p = Predictor.from_checkpoint(ct_only, device="cpu")
    assert p.modalities == ("ct",)
    with pytest.raises(AqcfError, match="trained on CT only; it cannot segment MRI"):
        p.check_modality("mri")


def test_device_and_precision_errors(predictor):
    if not torch.cuda.is_available():
        with pytest.raises(AqcfError, match="no CUDA"):
            Predictor(predictor.network, predictor.preprocessing, predictor.window, device="cuda")
    with pytest.raises(AqcfError, match="needs a CUDA device"):
        sliding_window_logits(predictor.network, torch.zeros(1, 1, 32, 32, 16), "ct", predictor.window, precision="16")
