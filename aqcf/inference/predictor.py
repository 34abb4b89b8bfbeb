"""Inference with a trained checkpoint: one scan in, a label map in the scan's own geometry out.

:meth:`Predictor.from_checkpoint` rebuilds everything from the checkpoint alone: the network (the
LightningModule's hyper-parameters are the training config, so ``load_from_checkpoint`` instantiates it),
each modality's preprocessing (from ``datamodule_hyper_parameters``: orientation, window, spacing,
padding), the modalities it was trained on, and its test-time sliding-window settings (``model.sw_*``:
window = the training patch, overlap, blending, windows per batch), any of which may be overridden.

One scan goes: :func:`aqcf.data.preprocess.preprocess_image` (reorient, crop to the body, resample, window,
pad) -> :func:`aqcf.networks.sliding_window.sliding_window_logits` (MONAI ``sliding_window_inference`` over
``network.forward_single(x, modality)``, eq. 17: the absent stream is zero-filled, with optional flip
test-time augmentation) -> argmax -> :func:`aqcf.data.preprocess.restore_to_original` (nearest neighbour
back onto the original voxel grid). The sliding-window core lives in :mod:`aqcf.networks.sliding_window`,
shared with validation and test; ``WindowSettings`` and ``sliding_window_logits`` stay importable from here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from aqcf.constants import MODALITIES, check_name
from aqcf.data.preprocess import PreprocessSettings, preprocess_image, restore_to_original
from aqcf.errors import AqcfError, first_line
from aqcf.networks.sliding_window import (
    PRECISIONS,
    WindowSettings,
    argmax_labels,
    sliding_window_logits,
    sliding_window_present,
)

__all__ = [
    "DEVICES",
    "Segmentation",
    "Predictor",
    "resolve_device",
    "restore_probabilities",
    "segmentation_from_probabilities",
    "load_checkpoint_info",
]

DEVICES = ("auto", "cpu", "cuda")


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
    """A network with the preprocessing it was trained with and its test-time sliding-window settings.

    Args:
        network: a module with ``forward_single(x, modality)``; put in eval mode and moved to ``device``.
        preprocessing: modality -> its :class:`PreprocessSettings`; the keys are the modalities served.
        window: the sliding-window settings.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (or a ``torch.device``).
        precision: ``"32"``, ``"bf16"`` or ``"16"``.
        tta: mirror test-time augmentation (:func:`~aqcf.networks.sliding_window.flip_averaged`).
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
        (``model.patch_size``, ``model.sw_overlap``, ``model.sw_mode``, ``model.sw_batch_size``, as
        ``configs/lits_atlas.yaml`` sets them for the paper); ``None`` keeps them.

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
