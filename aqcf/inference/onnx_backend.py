"""``aqcf segment --backend onnxruntime``: a model written by ``aqcf export`` in place of a checkpoint.

The settings file beside the model (``model.onnx.json``) holds the modality, the preprocessing and the
sliding-window settings the checkpoint had, so no checkpoint is needed. The onnxruntime session
(:func:`aqcf.inference.export.onnx_window_predictor`) stands in for ``network.forward_single`` inside
the same :class:`~aqcf.inference.predictor.Predictor`: same preprocessing, same MONAI sliding window,
same restoring, so the masks equal the torch backend's up to onnxruntime's float32 rounding.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor, nn

from aqcf.data.preprocess import PreprocessSettings
from aqcf.errors import AqcfError
from aqcf.inference.predictor import Predictor
from aqcf.networks.sliding_window import WindowSettings

__all__ = ["OnnxNetwork", "onnx_predictor"]


class OnnxNetwork(nn.Module):
    """An exported single-modality graph behind the ``forward_single(x, modality)`` of a network.

    Args:
        predict: window predictor ``(B, 1, X, Y, Z) -> (B, C, X, Y, Z)`` logits.
        modality: the one modality the graph serves.
        num_classes: output channels.
        divisor: every spatial size must be a multiple of it (the exported network's halvings).
    """

    def __init__(self, predict: Callable[[Tensor], Tensor], modality: str, num_classes: int, divisor: int) -> None:
        super().__init__()
        self.predict = predict
        self.modality = modality
        self.num_classes = num_classes
        self.divisor = divisor

    def forward_single(self, x: Tensor, modality: str) -> Tensor:
        if modality != self.modality:
            raise AqcfError(f"the exported model serves {self.modality.upper()} only, not {modality.upper()}")
        return self.predict(x)


def onnx_predictor(
    path: str | Path,
    tta: bool = False,
    roi_size: Sequence[int] | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    mode: str | None = None,
    stitch_on_cpu: bool = False,
) -> Predictor:
    """A CPU :class:`Predictor` over ``path`` (``.onnx``), set up from ``path.json``; ``None`` keeps its value.

    Raises:
        AqcfError: no or unreadable settings file, onnxruntime missing, or a model it cannot load.
    """
    from aqcf.inference.export import onnx_window_predictor, settings_path

    path = Path(path)
    settings_file = settings_path(path)
    try:
        settings = json.loads(settings_file.read_text())
        modality = settings["modality"]
        fields = {f.name for f in dataclasses.fields(PreprocessSettings)}
        preprocessing = PreprocessSettings(**{k: v for k, v in settings["preprocessing"].items() if k in fields})
        stored = settings["sliding_window"]
        classes = len(settings["classes"])
        divisor = int(settings["input"].get("spatial_multiple", 1))
    except FileNotFoundError:
        message = f"{path}: no settings file {settings_file.name} beside it; write both with `aqcf export`"
        raise AqcfError(message) from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise AqcfError(f"{settings_file}: not a settings file of `aqcf export` ({err!r})") from err
    window = WindowSettings(stored["roi_size"], stored["overlap"], stored["batch_size"], stored["mode"]).overridden(
        roi_size=roi_size, overlap=overlap, batch_size=batch_size, mode=mode, stitch_on_cpu=stitch_on_cpu
    )
    network = OnnxNetwork(onnx_window_predictor(path), modality, classes, divisor)
    return Predictor(network, {modality: preprocessing}, window, device="cpu", tta=tta, source=str(path))
