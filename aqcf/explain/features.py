"""Feature maps at key stages of the network (paper section 4.3, Figure 8).

Forward hooks record a layer's output on the unimodal path (eq. 17); a channel summary turns the
(B, 4C, ...) quaternion feature tensor into one map per sample:

* ``"mean_abs"`` (default): the mean absolute activation over all real channels, i.e. how strongly
  the stage responds at each voxel, whatever the channel;
* ``"pca"``: the projection on the first principal component of the channels (over the voxels of the
  sample), the single direction along which the features vary most. Its sign is arbitrary; it is
  chosen so that the map correlates positively with ``mean_abs``.

Either map is scaled to [0, 1] per sample and upsampled trilinearly to the input grid for display
(:func:`aqcf.visualize.maps.plot_feature_maps` draws them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqcf.constants import check_stream
from aqcf.errors import AqcfError
from aqcf.explain.layers import available_layers, check_layer
from aqcf.explain.scores import normalise_maps

__all__ = [
    "MEAN_ABS",
    "PCA",
    "SUMMARIES",
    "feature_layers",
    "capture_features",
    "summarise_channels",
    "feature_maps",
]

MEAN_ABS = "mean_abs"
PCA = "pca"
SUMMARIES = (MEAN_ABS, PCA)


def feature_layers(network: nn.Module, modality: str) -> dict[str, str]:
    """Figure 8's columns: an early encoder stage, a middle one and the (shared) bottleneck.

    Returns:
        ``{column title: layer name}``: stage 1 (the first downsampling stage, ``encoders.M.0``), stage
        ``ceil(n / 2)`` of ``n`` (``encoders.M.1`` for the paper's four) and the bottleneck.
    """
    names = available_layers(network, modality)
    m = check_stream(modality, network)
    stages = [n for n in names if n.startswith(f"encoders.{m}.")]
    middle = (len(stages) + 1) // 2
    bottleneck = next(n for n in names if n.startswith("bottleneck"))
    shared = "shared bottleneck" if bottleneck == "bottleneck" else f"{m.upper()} bottleneck"
    return {
        "early encoder (stage 1)": stages[0],
        f"middle encoder (stage {middle})": stages[middle - 1],
        shared: bottleneck,
    }


def capture_features(network: nn.Module, x: Tensor, modality: str, layers: Sequence[str]) -> dict[str, Tensor]:
    """Outputs of ``layers`` in one unimodal forward pass (``forward_single``, no gradients).

    Args:
        network: an :class:`~aqcf.networks.aqcfnet.AQCFNet`.
        x: (B, 1, X, Y, Z) preprocessed input.
        modality: its modality.
        layers: layer names (:func:`~aqcf.explain.layers.available_layers`).

    Returns:
        ``{layer: (B, C, X', Y', Z') tensor}``, detached.
    """
    modules = dict(network.named_modules())
    names = [check_layer(network, modality, layer) for layer in layers]
    captured: dict[str, Tensor] = {}

    def hook(name: str):
        def record(_module, _inputs, output):
            captured[name] = output.detach()

        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            network.forward_single(x, modality)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def summarise_channels(features: Tensor, method: str = MEAN_ABS) -> Tensor:
    """One map per sample from a feature tensor, scaled to [0, 1].

    Args:
        features: (B, C, X, Y, Z).
        method: ``"mean_abs"`` or ``"pca"`` (see the module docstring).

    Returns:
        (B, 1, X, Y, Z) float32 in [0, 1].
    """
    if method not in SUMMARIES:
        raise AqcfError(f"feature summary {method!r}: expected one of {SUMMARIES}")
    features = features.detach().float()
    magnitude = features.abs().mean(dim=1, keepdim=True)
    if method == MEAN_ABS:
        return normalise_maps(magnitude)
    maps = []
    for sample, strength in zip(features, magnitude, strict=True):
        flat = sample.flatten(1)  # (C, N)
        centred = flat - flat.mean(dim=1, keepdim=True)
        # C x C covariance: cheaper than an SVD of the N x C matrix, N being the voxel count
        _, vectors = torch.linalg.eigh(centred @ centred.T)
        projection = vectors[:, -1] @ centred
        if torch.dot(projection - projection.mean(), strength.flatten() - strength.mean()) < 0:
            projection = -projection
        maps.append(projection.view(1, *sample.shape[1:]))
    return normalise_maps(torch.stack(maps))


def feature_maps(
    network: nn.Module,
    x: Tensor,
    modality: str,
    layers: Mapping[str, str] | None = None,
    method: str = MEAN_ABS,
) -> dict[str, Tensor]:
    """Channel-summarised feature maps on the input grid, one per layer.

    Args:
        network: an :class:`~aqcf.networks.aqcfnet.AQCFNet`.
        x: (B, 1, X, Y, Z) preprocessed input.
        modality: its modality.
        layers: ``{title: layer}``; default :func:`feature_layers`.
        method: channel summary, ``"mean_abs"`` or ``"pca"``.

    Returns:
        ``{title: (B, X, Y, Z) float32 in [0, 1]}`` upsampled trilinearly to ``x``'s grid.
    """
    layers = dict(layers or feature_layers(network, modality))
    raw = capture_features(network, x, modality, list(layers.values()))
    size = tuple(x.shape[2:])
    out = {}
    for title, layer in layers.items():
        summary = summarise_channels(raw[layer], method)
        if tuple(summary.shape[2:]) != size:
            summary = normalise_maps(F.interpolate(summary, size=size, mode="trilinear", align_corners=False))
        out[title] = summary[:, 0]
    return out

