"""Inference with a trained checkpoint: one scan in, a label map in the scan's own geometry out.

:meth:`Predictor.from_checkpoint` rebuilds everything from the checkpoint alone: the network (the
LightningModule's hyper-parameters are the training config, so ``load_from_checkpoint`` instantiates it),
each modality's preprocessing (from ``datamodule_hyper_parameters``: orientation, window, spacing,
padding), the modalities it was trained on, and the sliding-window settings it was validated with
(window = the training patch, overlap, blending, windows per batch), any of which may be overridden.

One scan goes: :func:`aqcf.data.preprocess.preprocess_image` (reorient, crop to the body, resample, window,
pad) -> MONAI ``sliding_window_inference`` over ``network.forward_single(x, modality)`` (eq. 17: the absent
stream is zero-filled) with optional flip test-time augmentation -> argmax ->
:func:`aqcf.data.preprocess.restore_to_original` (nearest neighbour back onto the original voxel grid).
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from aqcf.constants import MODALITIES, check_name
from aqcf.data.preprocess import PreprocessSettings, preprocess_image, restore_to_original
from aqcf.errors import AqcfError, first_line

__all__ = [
    "DEVICES",
    "PRECISIONS",
    "BLEND_MODES",
    "TTA_AXES",
    "WindowSettings",
    "Segmentation",
    "Predictor",
    "resolve_device",
    "flip_averaged",
    "sliding_window_logits",
    "sliding_window_present",
    "argmax_labels",
    "restore_probabilities",
    "segmentation_from_probabilities",
    "load_checkpoint_info",
]

DEVICES = ("auto", "cpu", "cuda")
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


@dataclass
class Segmentation:
    """The result for one scan.

    Attributes:
        labels: uint8 (X, Y, Z) labels 0/1/2 on the scan's own voxel grid (shape of the input).
        record: the preprocessing record (both grids' shapes and affines, crop box).
        seconds: wall time per stage: ``preprocess``, ``inference``, ``restore``.
        probabilities: only when asked for: float16 (C, X, Y, Z) softmax on the scan's own grid
            (:func:`restore_probabilities`), channel i the probability of label i.
    """

    labels: np.ndarray
    record: dict
    seconds: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = None


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cuda"`` without a GPU is an error."""
    if name not in DEVICES:
        raise AqcfError(f"device {name!r}: need one of {DEVICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AqcfError("device 'cuda': no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)


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


def _stitched(image: Tensor, predictor, window: WindowSettings, device: torch.device) -> Tensor:
    """MONAI's sliding window over ``image``: windows on ``device``, stitched where ``window`` says."""
    from monai.inferers import sliding_window_inference

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


def restore_probabilities(probabilities, record: dict) -> np.ndarray:
    """Map class probabilities from the preprocessed grid back onto the scan's voxel grid.

    Nearest neighbour in world coordinates, the sampling :func:`restore_to_original` gives the labels,
    so the label of a voxel holds its largest restored probability. Voxels outside the preprocessed
    field of view (cropped away) get background probability 1, as their label is 0.

    Args:
        probabilities: (C, X, Y, Z) on the preprocessed grid (numpy array or tensor), channel 0 background.
        record: the record :func:`preprocess_image` gave for this scan.

    Returns:
        float16 (C, X', Y', Z') with the original scan's spatial shape, in its stored axis order.
    """
    import torchio as tio

    values = torch.as_tensor(np.asarray(probabilities), dtype=torch.float32)
    expected = tuple(record["preprocessed_shape"])
    if tuple(values.shape[1:]) != expected:
        raise AqcfError(f"probabilities of shape {tuple(values.shape)} do not match the preprocessed shape {expected}")
    image = tio.ScalarImage(tensor=values, affine=np.asarray(record["preprocessed_affine"], dtype=float))
    target = (tuple(int(n) for n in record["original_shape"]), np.asarray(record["original_affine"], dtype=float))
    restored = tio.Resample(target, image_interpolation="nearest")(image).data.numpy()
    # the field of view restored as labels are: outside it (padding value unknown) is background
    inside = restore_to_original(np.ones(expected, dtype=np.uint8), record).astype(bool)
    restored[:, ~inside] = 0.0
    restored[0][~inside] = 1.0
    return restored.astype(np.float16)


def load_checkpoint_info(path: str | Path) -> dict:
    """The checkpoint's hyper-parameters, without its weights.

    Returns:
        ``{"hyper_parameters": dict, "datamodule_hyper_parameters": dict | None}``.

    Raises:
        AqcfError: the file is missing, truncated or corrupt, or not an aqcf checkpoint
            (:func:`aqcf.training.checkpoint_io.check_checkpoint`).
    """
    from aqcf.training.checkpoint_io import check_checkpoint

    # memory-mapped: the weights are not read here
    checkpoint = check_checkpoint(path)
    return {
        "hyper_parameters": dict(checkpoint["hyper_parameters"]),
        "datamodule_hyper_parameters": checkpoint.get("datamodule_hyper_parameters"),
    }


class Predictor:
    """A network with the preprocessing and sliding-window settings it was trained and validated with.

    Args:
        network: a module with ``forward_single(x, modality)``; put in eval mode and moved to ``device``.
        preprocessing: modality -> its :class:`PreprocessSettings`; the keys are the modalities served.
        window: the sliding-window settings.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (or a ``torch.device``).
        precision: ``"32"``, ``"bf16"`` or ``"16"``.
        tta: mirror test-time augmentation (:func:`flip_averaged`).
        source: where the network came from (the checkpoint path), for messages and records.
    """

    def __init__(
        self,
        network: nn.Module,
        preprocessing: Mapping[str, PreprocessSettings],
        window: WindowSettings,
        device: str | torch.device = "auto",
        precision: str = "32",
        tta: bool = False,
        source: str | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise AqcfError(f"precision {precision!r}: need one of {tuple(PRECISIONS)}")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.network = network.to(self.device).eval()
        self.preprocessing = dict(preprocessing)
        self.window = window
        self.precision = precision
        self.tta = bool(tta)
        self.source = source or type(network).__name__
        divisor = int(getattr(network, "divisor", 1))
        if any(n % divisor for n in window.roi_size):
            raise AqcfError(
                f"window size {window.roi_size}: every axis must be divisible by {divisor} (the network's "
                "downsampling factor)"
            )

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this predictor serves, CT first, then MRI, then any other in training order."""
        return (*(m for m in MODALITIES if m in self.preprocessing),
                *(m for m in self.preprocessing if m not in MODALITIES))

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        precision: str = "32",
        tta: bool = False,
        roi_size: Sequence[int] | None = None,
        overlap: float | None = None,
        batch_size: int | None = None,
        mode: str | None = None,
        stitch_on_cpu: bool = False,
    ) -> Predictor:
        """Rebuild a predictor from a checkpoint written by ``aqcf fit``.

        The window size, overlap, blend mode and window batch size default to the checkpoint's own
        (``model.patch_size``, ``model.sw_overlap``, ``model.sw_mode``, ``model.sw_batch_size``: 256×256×16,
        0.8, Gaussian and 4 in ``configs/lits_atlas.yaml``); ``None`` keeps them.

        Raises:
            AqcfError: missing or unreadable checkpoint, or one without the data module's settings.
        """
        from aqcf.data.datamodule import cohorts_from_hparams, preprocess_settings_from_hparams
        from aqcf.models.segmentation import SegmentationModule
        from aqcf.networks.aqcfnet import complete_network_config

        path = Path(path)
        info = load_checkpoint_info(path)
        data_hparams = info["datamodule_hyper_parameters"]
        if not data_hparams:
            raise AqcfError(
                f"{path}: the checkpoint holds no data module settings (datamodule_hyper_parameters), so its "
                "preprocessing is unknown; use a checkpoint written by `aqcf fit`"
            )
        try:
            # a checkpoint older than the reading options is rebuilt as it was trained
            network = complete_network_config(info["hyper_parameters"].get("network"))
            module = SegmentationModule.load_from_checkpoint(path, map_location="cpu", network=network)
        except Exception as err:  # a foreign or damaged checkpoint fails in many ways
            raise AqcfError(f"{path}: cannot rebuild the model from this checkpoint ({first_line(err)})") from err
        served = tuple(getattr(module, "modalities", MODALITIES))
        # a modality trained on: served by the network and given a cohort (data.cohorts, or the ct_*/mri_*
        # fields of older checkpoints: a unimodal run sets the other root null)
        try:
            cohorts = {c.name for c in cohorts_from_hparams(data_hparams)}
        except (AqcfError, KeyError) as err:
            raise AqcfError(f"{path}: unreadable data module settings ({first_line(err)})") from err
        trained = [m for m in served if m in cohorts]
        preprocessing = {m: preprocess_settings_from_hparams(data_hparams, m) for m in trained}
        stored = WindowSettings(module.patch_size, module.sw_overlap, module.sw_batch_size, module.sw_mode)
        window = stored.overridden(roi_size=roi_size, overlap=overlap, batch_size=batch_size, mode=mode,
                                   stitch_on_cpu=stitch_on_cpu)
        return cls(module.network, preprocessing, window, device, precision, tta, source=str(path))

    def check_modality(self, modality: str) -> str:
        """``modality`` lower-cased, or :class:`AqcfError` if the model was not trained on it."""
        modality = check_name(modality)
        if modality not in self.preprocessing:
            names = [m.upper() for m in self.modalities]
            trained = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 2 else names) or "no modality"
            raise AqcfError(
                f"{self.source}: trained on {trained} only; it cannot segment {modality.upper()} scans"
            )
        return modality

    def settings(self) -> dict:
        """JSON-able description of how scans are segmented (written beside each mask)."""
        return {
            "checkpoint": self.source,
            "window": list(self.window.roi_size),
            **{k: v for k, v in asdict(self.window).items() if k != "roi_size"},
            "tta": self.tta,
            "device": str(self.device),
            "precision": self.precision,
        }

    def with_window(self, **changes) -> Predictor:
        """A predictor sharing this network with some window settings changed (e.g. ``overlap=0.5``)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.window = replace(self.window, **changes)
        return other

    def _logits(self, image: Tensor, modality: str) -> Tensor:
        """Stitched logits (1, C, X, Y, Z) of one preprocessed volume (1, X, Y, Z)."""
        modality = self.check_modality(modality)
        return sliding_window_logits(
            self.network, image[None].float(), modality, self.window, self.device, self.tta, self.precision
        )

    @torch.inference_mode()
    def labels_on_grid(self, image: Tensor, modality: str) -> Tensor:
        """Labels of one preprocessed volume.

        Args:
            image: (1, X, Y, Z) float in [0, 1] (the output of :func:`preprocess_image`).
            modality: ``"ct"`` or ``"mri"``.

        Returns:
            uint8 CPU tensor (X, Y, Z) with values 0/1/2 on the preprocessed grid.
        """
        return argmax_labels(self._logits(image, modality))

    @torch.inference_mode()
    def probabilities_on_grid(self, image: Tensor, modality: str) -> Tensor:
        """Softmax of the stitched logits of one preprocessed volume.

        Args:
            image: (1, X, Y, Z) float in [0, 1] (the output of :func:`preprocess_image`).
            modality: ``"ct"`` or ``"mri"``.

        Returns:
            float32 CPU tensor (C, X, Y, Z), summing to 1 over C at every voxel.
        """
        return torch.softmax(self._logits(image, modality)[0], dim=0).cpu()

    @torch.inference_mode()
    def logits_present(self, images: Mapping[str, Tensor], outputs: Sequence[str]) -> dict[str, Tensor]:
        """Stitched logits of several streams from co-registered preprocessed volumes of one patient.

        Args:
            images: ``{modality: (1, X, Y, Z)}`` on one preprocessed grid, float in [0, 1]; every
                modality one the model was trained on (the other streams are zero-filled).
            outputs: the modalities whose logits to return (trained ones).

        Returns:
            ``{modality: float32 (1, C, X, Y, Z)}`` for ``outputs`` (:func:`sliding_window_present`).

        Raises:
            AqcfError: an untrained modality, or test-time augmentation asked for (not supported here).
        """
        if self.tta:
            raise AqcfError("test-time augmentation is not supported with several modalities")
        named = {self.check_modality(m): image[None].float() for m, image in images.items()}
        wanted = [self.check_modality(m) for m in outputs]
        return sliding_window_present(self.network, named, wanted, self.window, self.device, self.precision)

    def segment_file(self, path: str | Path, modality: str, probabilities: bool = False) -> Segmentation:
        """Segment one scan file (NIfTI) into labels on its own voxel grid.

        Args:
            path: the scan (HU for CT).
            modality: ``"ct"`` or ``"mri"``; must be one the model was trained on.
            probabilities: also return the softmax on the scan's grid (the labels are then its argmax,
                which equals the argmax of the logits).

        Returns:
            The :class:`Segmentation`: labels of exactly the scan's shape, in its stored axis order.

        Raises:
            AqcfError: an untrained modality, or a scan the input gate refuses (:mod:`aqcf.data.gate`:
                truncated, not one 3D volume, non-finite voxels, a degenerate affine); the message
                names the file.
        """
        modality = self.check_modality(modality)
        start = time.perf_counter()
        image, record = preprocess_image(path, self.preprocessing[modality])
        preprocessed = time.perf_counter()
        if not probabilities:
            labels = self.labels_on_grid(image, modality)
            inferred = time.perf_counter()
            restored = restore_to_original(labels.numpy(), record)
            done = time.perf_counter()
            seconds = {"preprocess": preprocessed - start, "inference": inferred - preprocessed,
                       "restore": done - inferred}
            return Segmentation(labels=restored, record=record, seconds=seconds)
        return segmentation_from_probabilities(self.probabilities_on_grid(image, modality), record, start, preprocessed)


def segmentation_from_probabilities(
    probabilities: Tensor, record: dict, start: float, preprocessed: float, keep: bool = True
) -> Segmentation:
    """Labels (argmax) and, with ``keep``, the probabilities of (C, X, Y, Z) softmax, both on the scan's grid.

    ``start`` and ``preprocessed`` are the ``time.perf_counter()`` readings before and after preprocessing.
    """
    inferred = time.perf_counter()
    labels = argmax_labels(probabilities[None])
    restored = restore_to_original(labels.numpy(), record)
    kept = restore_probabilities(probabilities, record) if keep else None
    done = time.perf_counter()
    seconds = {"preprocess": preprocessed - start, "inference": inferred - preprocessed, "restore": done - inferred}
    return Segmentation(labels=restored, record=record, seconds=seconds, probabilities=kept)
