"""Grad-CAM / Grad-CAM++ of the tumor class, layers, windows and feature maps (aqcf.explain)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from aqcf.errors import AqcfError
from aqcf.explain.features import feature_layers, feature_maps, summarise_channels
from aqcf.explain.layers import available_layers, check_layer, default_layer
from aqcf.explain.saliency import METHODS, TumorSaliency
from aqcf.explain.scores import ClassScore, normalise_maps
from aqcf.explain.windows import extract_window

WINDOW = (32, 32, 16)  # the tiny run's training patch


@pytest.fixture(scope="module")
def network(tiny_run):
    from aqcf.models.segmentation import SegmentationModule

    module = SegmentationModule.load_from_checkpoint(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu")
    return module.network.eval()


def _input(batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, *WINDOW, generator=generator)


# ------------------------------------------------------------------------------------------ saliency maps
@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_maps_have_input_shape_and_unit_range(network, modality):
    x = _input(batch=2)
    with TumorSaliency(network, modality) as explain:
        for method in METHODS:
            maps = explain(x, method)
            assert maps.shape == (2, *WINDOW)
            assert torch.isfinite(maps).all()
            assert maps.min() >= 0 and maps.max() <= 1
            for sample in maps:  # each map scaled on its own: its peak is 1
                assert sample.max() == pytest.approx(1.0, abs=1e-5)
            assert explain.score.last_region_voxels.shape == (2,)


def test_coarse_layer_is_upsampled_to_the_input_grid(network):
    with TumorSaliency(network, "mri", layer="bottleneck") as explain:
        maps = explain(_input(), "gradcampp")
    assert maps.shape == (1, *WINDOW)
    assert maps.min() >= 0 and maps.max() <= 1
    # bottleneck cells are 16 x 16 x 16 input voxels: trilinear upsampling must vary inside a cell
    assert torch.unique(maps).numel() > 8


def test_gradcam_at_the_last_decoder_stage_is_the_tumor_evidence(network):
    # The head is a linear 1x1x1 conv, so Grad-CAM at its input equals ReLU(tumor logit - head bias),
    # rescaled; the logits come from the joint forward with a zero MRI stream (eq. 17).
    x = _input()
    with TumorSaliency(network, "ct") as explain:
        assert explain.layer == "decoders.ct.stages.3"
        maps = explain(x, "gradcam")
    with torch.no_grad():
        logits_ct, _ = network(x, torch.zeros_like(x))
    evidence = torch.relu(logits_ct[0, 2] - network.heads["ct"].bias[2])
    expected = (evidence - evidence.min()) / (evidence.max() - evidence.min())
    torch.testing.assert_close(maps[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", ["decoders.mri.stages.3", "bottleneck", "encoders.mri.0"])
def test_tumor_score_gradient_reaches_the_layer(network, layer):
    x = _input(seed=1)
    with TumorSaliency(network, "mri", layer=layer) as explain:
        explain(x, "gradcam")
        recorded = explain.gradient.detach().clone()

    # the same gradient by hand: mean tumor logit over the predicted tumor voxels, autograd to the layer
    captured = {}
    module = dict(network.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, out: captured.setdefault("out", out))
    try:
        logits = network.forward_single(x, "mri")
    finally:
        handle.remove()
    region = (logits.argmax(dim=1) == 2).float()
    if region.sum() == 0:
        region = torch.ones_like(region)
    score = (logits[:, 2] * region).sum() / region.sum()
    (expected,) = torch.autograd.grad(score, captured["out"])
    assert expected.abs().sum() > 0
    torch.testing.assert_close(recorded, expected, atol=1e-6, rtol=1e-4)


def test_closing_removes_the_hooks(network):
    explain = TumorSaliency(network, "ct")
    explain(_input(), "gradcam")
    assert explain.activation is not None
    explain.close()
    with torch.no_grad():
        network.forward_single(_input(), "ct")
    assert explain.activation is None and explain.gradient is None
    with pytest.raises(AqcfError, match="closed"):
        explain(_input(), "gradcam")


def test_unknown_method(network):
    with TumorSaliency(network, "ct") as explain, pytest.raises(AqcfError, match="gradcampp"):
        explain(_input(), "lime")


# ------------------------------------------------------------------------------------------------- layers
def test_layer_names(network):
    assert available_layers(network, "ct") == [
        "stems.ct",
        "encoders.ct.0",
        "encoders.ct.1",
        "encoders.ct.2",
        "encoders.ct.3",
        "bottleneck",
        "decoders.ct.stages.0",
        "decoders.ct.stages.1",
        "decoders.ct.stages.2",
        "decoders.ct.stages.3",
    ]
    assert default_layer(network, "mri") == "decoders.mri.stages.3"
    assert check_layer(network, "ct", None) == "decoders.ct.stages.3"
    assert check_layer(network, "ct", "decoders.ct.stages.2.convs.0") == "decoders.ct.stages.2.convs.0"


@pytest.mark.parametrize("layer", ["decoder", "decoders.mri.stages.3", "fusion.0", "heads.ct"])
def test_bad_layer_is_one_line_naming_the_layers(network, layer):
    with pytest.raises(AqcfError) as info:
        TumorSaliency(network, "ct", layer=layer)
    message = str(info.value)
    assert "\n" not in message
    assert repr(layer) in message
    assert "decoders.ct.stages.3" in message and "bottleneck" in message and "encoders.ct.0" in message


# ------------------------------------------------------------------------------------------ score wrapper
class _FixedLogits(nn.Module):
    """A stand-in network whose unimodal path returns given logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.calls = []

    def forward_single(self, x, modality):
        self.calls.append(modality)
        return self.logits


def test_class_score_averages_over_the_predicted_tumor():
    logits = torch.zeros(2, 3, 2, 2, 1)
    logits[0, 2, 0, 0, 0] = 5.0  # sample 0: one voxel predicted tumor
    logits[0, 1, 1, 1, 0] = 3.0
    logits[1, 1] = 1.0  # sample 1: liver everywhere, no tumor predicted
    logits[1, 2, 0, 1, 0] = 0.5
    score = ClassScore(_FixedLogits(logits), "mri")
    out = score(torch.zeros(2, 1, 2, 2, 1))
    # sample 0: the region is the single tumor voxel
    torch.testing.assert_close(out[0], torch.tensor([0.0, 0.0, 5.0]))
    # sample 1: empty region -> all four voxels: liver 1, tumor 0.5 / 4
    torch.testing.assert_close(out[1], torch.tensor([0.0, 1.0, 0.125]))
    assert score.last_region_voxels.tolist() == [1, 4]
    assert score.last_fallback.tolist() == [False, True]
    assert score.network.calls == ["mri"]

    whole = ClassScore(_FixedLogits(logits), "mri", region="volume")(torch.zeros(2, 1, 2, 2, 1))
    torch.testing.assert_close(whole[0], torch.tensor([0.0, 0.75, 1.25]))


def test_normalise_maps():
    maps = torch.tensor([[[[[1.0, 3.0, 2.0]]]], [[[[0.0, 0.0, 0.0]]]]])
    out = normalise_maps(maps)
    torch.testing.assert_close(out[0].flatten(), torch.tensor([0.0, 1.0, 0.5]))
    assert (out[1] == 0).all()


# ------------------------------------------------------------------------------------------------ windows
def test_window_is_centred_on_the_largest_tumor_and_kept_inside():
    image = np.random.default_rng(0).random((64, 48, 40)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[5:30, 5:30, 5:30] = 1
    label[2:8, 3:9, 20:27] = 2  # large tumor near the x/y corner
    label[40:42, 40:42, 2:4] = 2  # small one elsewhere
    image_w, label_w, window = extract_window(image, label, (32, 32, 16), divisor=16)
    assert image_w.shape == label_w.shape == (32, 32, 16)
    assert window.centred_on == "tumor"
    # tumor centre (4.5, 5.5, 23): x and y starts clipped to 0, z starts at 23 - 16 / 2 = 15
    assert window.start == (0, 0, 15)
    assert (label_w == 2).sum() == 6 * 6 * 7
    np.testing.assert_array_equal(image_w, image[0:32, 0:32, 15:31])


def test_small_volume_is_padded_and_tumor_free_is_centred_on_the_liver():
    image = np.ones((20, 40, 16), np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[:, 30:40, 4:12] = 1
    image_w, label_w, window = extract_window(image, label, (32, 32, 16), divisor=16)
    assert image_w.shape == (32, 32, 16)
    assert window.centred_on == "liver"
    assert window.start[0] == -6  # 12 voxels of padding, 6 before
    assert image_w[:6].sum() == 0 and image_w[6:26].min() == 1 and image_w[26:].sum() == 0
    assert (label_w == 1).sum() == (label == 1).sum()  # the liver is inside the window


def test_whole_volume_is_padded_to_the_divisor():
    image = np.ones((20, 33, 16), np.float32)
    image_w, label_w, window = extract_window(image, np.zeros(image.shape, np.uint8), None, divisor=16)
    assert image_w.shape == (32, 48, 16) and window.centred_on == "whole"
    assert image_w.sum() == image.sum()


def test_window_size_must_fit_the_network():
    with pytest.raises(AqcfError, match="multiple of 16"):
        extract_window(np.zeros((32, 32, 32)), np.zeros((32, 32, 32)), (32, 32, 12), divisor=16)


# ------------------------------------------------------------------------------------------- feature maps
def test_mean_abs_summary():
    features = torch.tensor([[[[[1.0, -2.0]]], [[[-3.0, 0.0]]]]])  # (1, 2 channels, 1, 1, 2)
    # mean |.| over channels: [2, 1] -> scaled to [1, 0]
    torch.testing.assert_close(summarise_channels(features).flatten(), torch.tensor([1.0, 0.0]))


def test_pca_summary_recovers_a_rank_one_pattern():
    pattern = torch.linspace(0.0, 1.0, 24).reshape(2, 3, 4) ** 2
    weights = torch.tensor([0.5, -2.0, 1.0, 3.0])
    features = (weights[:, None, None, None] * pattern)[None]  # (1, 4, 2, 3, 4)
    out = summarise_channels(features, "pca")
    torch.testing.assert_close(out[0, 0], pattern / pattern.max(), atol=1e-5, rtol=0)


def test_feature_maps_of_the_figure(network):
    layers = feature_layers(network, "ct")
    assert list(layers.values()) == ["encoders.ct.0", "encoders.ct.1", "bottleneck"]
    maps = feature_maps(network, _input(), "ct")
    assert list(maps) == list(layers)
    for value in maps.values():
        assert value.shape == (1, *WINDOW)
        assert value.min() >= 0 and value.max() <= 1 and value.std() > 0
