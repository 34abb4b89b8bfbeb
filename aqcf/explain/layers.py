"""The layers of the network whose output can be explained for one modality, and the default one.

:func:`available_layers` lists the stem, the four encoder stages and the four decoder stages of the
explained stream, and the (shared) bottleneck: the layers on that stream's unimodal path (eq. 17). The
default (:func:`default_layer`) is the last decoder stage of the stream, the layer that feeds the
1×1×1 head, at the input's resolution; the bottleneck (``bottleneck``) shows what the shared,
modality-agnostic representation uses. Why this default, and which layers are offered:
docs/explain.md, *Saliency*.
"""

from __future__ import annotations

from torch import nn

from aqcf.constants import check_stream
from aqcf.errors import AqcfError

__all__ = ["available_layers", "default_layer", "check_layer"]


def available_layers(network: nn.Module, modality: str) -> list[str]:
    """Names of the layers whose output can be explained for ``modality``, shallow to deep to output.

    Args:
        network: an :class:`~aqcf.networks.aqcfnet.AQCFNet` (``stems``, ``encoders``, ``bottleneck``,
            ``decoders`` per modality).
        modality: ``"ct"`` or ``"mri"``: only that stream's layers (and the bottleneck) lie on its
            unimodal path.

    Returns:
        ``stems.M``, ``encoders.M.0`` .. ``encoders.M.{n-1}``, ``bottleneck`` (``bottleneck.M`` when the
        bottleneck is not shared), ``decoders.M.stages.0`` .. ``decoders.M.stages.{n-1}`` (deepest first;
        the last one feeds the head).
    """
    m = check_stream(modality, network)
    try:
        stages = len(network.encoders[m])
        decoder_stages = len(network.decoders[m].stages)
    except (AttributeError, KeyError, TypeError) as err:
        raise AqcfError(f"{type(network).__name__}: not a two-stream A-QCF-Net (no {m} encoder/decoder)") from err
    bottleneck = "bottleneck" if isinstance(network.bottleneck, nn.Sequential) else f"bottleneck.{m}"
    return [
        f"stems.{m}",
        *(f"encoders.{m}.{s}" for s in range(stages)),
        bottleneck,
        *(f"decoders.{m}.stages.{s}" for s in range(decoder_stages)),
    ]


def default_layer(network: nn.Module, modality: str) -> str:
    """The last decoder stage of ``modality``'s stream, the input of its 1×1×1 head (see the module docstring)."""
    return available_layers(network, modality)[-1]


def check_layer(network: nn.Module, modality: str, layer: str | None) -> str:
    """Return ``layer`` (or the default when None) if it lies on ``modality``'s unimodal path.

    A layer is one of :func:`available_layers` or a submodule of one (``decoders.ct.stages.3.convs.0``).

    Raises:
        AqcfError: one line naming the available layers.
    """
    names = available_layers(network, modality)
    if layer is None:
        return names[-1]
    layer = str(layer)
    modules = dict(network.named_modules())
    if layer in modules and any(layer == n or layer.startswith(n + ".") for n in names):
        return layer
    raise AqcfError(
        f"layer {layer!r} is not on the {modality} stream's path; available layers: {', '.join(names)} "
        f"(or a submodule of one)"
    )
