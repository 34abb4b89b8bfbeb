"""Whole-volume logits of a patch-trained network: MONAI's sliding window, pure functions.

The one sliding-window core of validation and test (:meth:`aqcf.models.segmentation.SegmentationModule.predict_volume`)
and of deployment (:class:`aqcf.inference.predictor.Predictor`, the ONNX backend, the ensembles):

* :class:`WindowSettings`: window size, overlap, blending, windows per batch, where the volume is stitched;
* :func:`sliding_window_logits`: one modality on the unimodal path (eq. 17: the absent stream zero-filled by
  ``network.forward_single``), with optional mirror test-time augmentation (:func:`flip_averaged`) and
  autocast;
* :func:`sliding_window_present`: several co-registered modalities cut at the same windows
  (``network.forward_present``);
* :func:`argmax_labels`: the label map of stitched logits.

No state and no files: the network and the settings come in, tensors go out.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from aqcf.constants import check_name
from aqcf.errors import AqcfError

__all__ = [
    "PRECISIONS",
    "BLEND_MODES",
    "TTA_AXES",
    "WindowSettings",
    "flip_averaged",
    "sliding_window_logits",
    "sliding_window_present",
    "argmax_labels",
]

PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
BLEND_MODES = ("gaussian", "constant")
#: spatial dimensions of a (B, C, X, Y, Z) tensor: the flips of test-time augmentation
TTA_AXES = (2, 3, 4)
# slices per argmax chunk: an int64 argmax of a whole volume would cost 8 bytes per voxel at once
_ARGMAX_CHUNK = 32


@dataclass(frozen=True)
class WindowSettings:
    """Sliding-window inference settings (MONAI ``sliding_window_inference``).

    Attributes:
        roi_size: window (X, Y, Z) in voxels of the preprocessed grid; each axis divisible by the
            network's downsampling factor (16 for four halvings).
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1) (paper: 0.8).
        batch_size: windows per forward pass.
        mode: blending of overlapping windows: ``"gaussian"`` (weights fall off toward the window's
            border, sigma = 0.125 × window) or ``"constant"`` (plain average).
        stitch_on_cpu: stitch the whole-volume logits in CPU memory while windows run on the GPU, so a
            large volume needs GPU memory for one window batch only.
    """

    roi_size: tuple[int, int, int] = (256, 256, 16)
    overlap: float = 0.8
    batch_size: int = 4
    mode: str = "gaussian"
    stitch_on_cpu: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "roi_size", tuple(int(n) for n in self.roi_size))
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise AqcfError(f"window size {self.roi_size}: need three positive sizes in voxels")
        if not 0.0 <= float(self.overlap) < 1.0:
            raise AqcfError(f"overlap {self.overlap}: need a value in [0, 1)")
        if int(self.batch_size) < 1:
            raise AqcfError(f"window batch size {self.batch_size}: need a positive integer")
        if self.mode not in BLEND_MODES:
            raise AqcfError(f"blend mode {self.mode!r}: need one of {BLEND_MODES}")

    def overridden(self, **changes) -> WindowSettings:
        """These settings with the ``changes`` that are not ``None`` (an option left out keeps its value)."""
        return replace(self, **{name: value for name, value in changes.items() if value is not None})


def flip_averaged(predictor: Callable[[Tensor], Tensor], axes: Sequence[int] = TTA_AXES) -> Callable:
    """Test-time augmentation by mirroring: average the logits over every subset of flipped ``axes``.

    Each flipped window's output is flipped back before averaging (nnU-Net's mirroring: 2**len(axes)
    passes, 8 for three axes).
    """
    subsets = [dims for r in range(len(axes) + 1) for dims in itertools.combinations(axes, r)]

    def averaged(x: Tensor) -> Tensor:
        total = predictor(x)
        for dims in subsets[1:]:
            total = total + torch.flip(predictor(torch.flip(x, dims)), dims)
        return total / len(subsets)

    return averaged


def _autocast(predictor: Callable, device_type: str, dtype: torch.dtype) -> Callable:
    def cast(x: Tensor) -> Tensor:
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = predictor(x)
        # blending in float32: the stitched sums of many low-precision windows would lose digits
        return out.float()

    return cast


def _window_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for float32); float16 only on CUDA."""
    if precision not in PRECISIONS:
        raise AqcfError(f"precision {precision!r}: need one of {tuple(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype == torch.float16 and device.type != "cuda":
        raise AqcfError("precision '16' needs a CUDA device; use 'bf16' or '32' on the CPU")
    return dtype


def _stitched(image: Tensor, predictor: Callable, window: WindowSettings, device: torch.device) -> Tensor:
    """MONAI's sliding window over ``image``: windows on ``device``, stitched where ``window`` says."""
    stitch = torch.device("cpu") if window.stitch_on_cpu else device
    return sliding_window_inference(
        image.to(stitch),
        roi_size=window.roi_size,
        sw_batch_size=window.batch_size,
        predictor=predictor,
        overlap=window.overlap,
        mode=window.mode,
        sw_device=device,
        device=stitch,
    )


def sliding_window_logits(
    network: nn.Module,
    image: Tensor,
    modality: str,
    window: WindowSettings,
    device: torch.device | str = "cpu",
    tta: bool = False,
    precision: str = "32",
) -> Tensor:
    """Whole-volume logits of one modality by sliding-window inference on the unimodal path (eq. 17).

    Args:
        network: provides ``forward_single(x, modality)`` (:class:`aqcf.networks.aqcfnet.AQCFNet`).
        image: preprocessed (B, 1, X, Y, Z) float in [0, 1]; volumes smaller than the window are
            zero-padded by MONAI and cropped back.
        modality: ``"ct"`` or ``"mri"``.
        window: the sliding-window settings.
        device: where windows are computed (the network must be there already).
        tta: average over mirrored copies (:func:`flip_averaged`, 8× the windows' cost).
        precision: ``"32"``, ``"bf16"`` or ``"16"`` (autocast of the network; stitching stays float32).
            ``"32"`` adds no autocast of its own, so one already active (Lightning's) still applies.

    Returns:
        float32 logits (B, C, X, Y, Z), on the CPU when ``window.stitch_on_cpu`` else on ``device``.
    """
    device = torch.device(device)
    dtype = _window_dtype(precision, device)
    # any stream name: the network refuses one it does not serve
    predictor = functools.partial(network.forward_single, modality=check_name(modality))
    if dtype is not None:
        predictor = _autocast(predictor, device.type, dtype)
    if tta:
        predictor = flip_averaged(predictor)
    return _stitched(image, predictor, window, device)


def sliding_window_present(
    network: nn.Module,
    images: Mapping[str, Tensor],
    outputs: Sequence[str],
    window: WindowSettings,
    device: torch.device | str = "cpu",
    precision: str = "32",
) -> dict[str, Tensor]:
    """Logits of several streams by one sliding window over several co-registered images (eq. 17).

    The images are stacked as channels so MONAI cuts every window at the same place of all of them;
    each window runs ``network.forward_present`` on its slices (the streams not given are zero-filled),
    and the requested streams' logits come back stacked as channels, stitched once.

    Args:
        network: provides ``forward_present(images, outputs)`` (:class:`aqcf.networks.aqcfnet.AQCFNet`).
        images: ``{stream: (B, C_in, X, Y, Z)}`` preprocessed onto one grid, float in [0, 1].
        outputs: the streams whose logits to return.
        window: the sliding-window settings.
        device: where windows are computed (the network must be there already).
        precision: ``"32"``, ``"bf16"`` or ``"16"`` (autocast of the network; stitching stays float32).

    Returns:
        ``{stream: float32 (B, C, X, Y, Z)}`` for ``outputs`` in that order, on the CPU when
        ``window.stitch_on_cpu`` else on ``device``.
    """
    device = torch.device(device)
    dtype = _window_dtype(precision, device)
    names = [check_name(m) for m in images]
    outputs = [check_name(m) for m in outputs]
    channels = [int(images[m].shape[1]) for m in images]

    def present(x: Tensor) -> Tensor:
        sliced = dict(zip(names, torch.split(x, channels, dim=1), strict=True))
        logits = network.forward_present(sliced, outputs=outputs)
        return torch.cat([logits[m] for m in outputs], dim=1)

    predictor = _autocast(present, device.type, dtype) if dtype is not None else present
    stacked = _stitched(torch.cat(list(images.values()), dim=1), predictor, window, device)
    return dict(zip(outputs, torch.chunk(stacked, len(outputs), dim=1), strict=True))


def argmax_labels(logits: Tensor) -> Tensor:
    """Class index per voxel of (1, C, X, Y, Z) logits as a uint8 CPU tensor (X, Y, Z), slab by slab."""
    chunks = [
        logits[0, ..., start : start + _ARGMAX_CHUNK].argmax(dim=0).to(torch.uint8).cpu()
        for start in range(0, logits.shape[-1], _ARGMAX_CHUNK)
    ]
    return torch.cat(chunks, dim=-1)
