"""Modality-specific preprocessing (paper §3.1.2) of one scan, its inverse, and ``aqcf preprocess``.

One scan goes through, in this order (TorchIO transforms):

1. ``ToOrientation``: CT to RAS, MRI to LAS (axis permutation and flips only, nothing resampled).
2. Foreground crop, computed from the image alone so that unlabeled scans at inference are cropped by
   the same rule: voxels above the window floor (the voxels the window does not send to 0) form the
   body mask; along each axis the crop keeps the slices holding at least ``foreground_min_fraction``
   of body voxels, which ignores isolated noise specks. Cropping before resampling gives the same
   region as after and touches fewer voxels. During cohort preprocessing the box is widened to
   contain every labelled voxel (the manifest records when that happened).
3. ``Resample`` to ``spacing`` (mm): linear for the image, nearest neighbour for the label.
4. ``Clamp`` to the window and ``RescaleIntensity`` to [0, 1] (windows: :data:`DEFAULT_WINDOWS`).
5. ``EnsureShapeMultiple``: zero-pad (symmetrically) every axis to a multiple of ``pad_multiple``
   (for the network's four halvings).

Default values and their reasons: :class:`PreprocessSettings` and docs/data.md, *Preprocessing*.

:func:`preprocess_image` does this for one unlabeled scan and returns a record of the geometry;
:func:`restore_to_original` maps a label map on the preprocessed grid back onto the original image's
voxel grid (nearest neighbour), which is how ``aqcf segment`` writes its masks.

:func:`preprocess_subject` is the pipeline itself, a TorchIO subject and its record out (what the
cache, :mod:`aqcf.data.cache`, stores per case). A cohort whose masks code the classes otherwise declares
its ``labels`` (:func:`label_mapping`); every label map is mapped right after it is read, before the
label check. ``aqcf preprocess`` (:func:`main`) runs it over a cohort into the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aqcf.constants import CLASS_NAMES, CT, MRI, check_label_values, check_name
from aqcf.data import gate
from aqcf.data.cohorts import read_cohort
from aqcf.data.gate import SAME_GRID_TOLERANCE_MM, check_same_grid
from aqcf.errors import AqcfError, ArgumentParser

__all__ = [
    "PIPELINE_VERSION",
    "PreprocessSettings",
    "foreground_box",
    "load_scan",
    "preprocess_subject",
    "preprocess_image",
    "restore_to_original",
    "DEFAULT_LABELS",
    "label_mapping",
    "map_labels",
    "main",
]

PIPELINE_VERSION = 2
"""Bumped whenever the pipeline's output changes for the same settings, so old caches are not reused.

2: the cache also holds each case's label locations (``locations/<id>.npz``) and records every cached
file's size and checksum."""

DEFAULT_WINDOWS = {CT: (-16.0, 176.0), MRI: (74.0, 511.0)}
DEFAULT_ORIENTATIONS = {CT: "RAS", MRI: "LAS"}
DEFAULT_LABELS = {0: 0, 1: 1, 2: 2}
"""A cohort's mask value -> the project's class (0 background, 1 liver, 2 tumor): the identity."""


@dataclass(frozen=True)
class PreprocessSettings:
    """Preprocessing of one modality.

    Attributes:
        modality: ``"ct"`` or ``"mri"``.
        orientation: Target axis codes (nibabel ``aff2axcodes``): the paper uses RAS for CT, LAS for MRI.
        window: ``(low, high)`` intensities mapped linearly to [0, 1] and clipped (HU for CT).
        spacing: Target voxel size in mm.
        pad_multiple: Every spatial size is zero-padded up to a multiple of this.
        foreground_threshold: Intensity above which a voxel is body, in the scan's units; ``None``
            means the window's low end.
        foreground_min_fraction: A slice (along any axis) is kept by the crop when at least this
            fraction of its voxels is body.
    """

    modality: str
    orientation: str
    window: tuple[float, float]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pad_multiple: int = 16
    foreground_threshold: float | None = None
    foreground_min_fraction: float = 1e-3

    def __post_init__(self) -> None:
        # any cohort name: a config's cohorts name themselves (aqcf.data.datamodule.Cohort)
        object.__setattr__(self, "modality", check_name(self.modality))
        object.__setattr__(self, "orientation", str(self.orientation).upper())
        object.__setattr__(self, "window", tuple(float(x) for x in self.window))
        object.__setattr__(self, "spacing", tuple(float(x) for x in self.spacing))
        codes = self.orientation
        if len(codes) != 3 or not all(sum(c in codes for c in pair) == 1 for pair in ("LR", "AP", "IS")):
            raise AqcfError(
                f"orientation {self.orientation!r}: need three codes, one of R/L, A/P and I/S each"
            )
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise AqcfError(f"window {self.window}: need (low, high) with low < high")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise AqcfError(f"spacing {self.spacing}: need three positive sizes in mm")
        if int(self.pad_multiple) < 1:
            raise AqcfError(f"pad multiple {self.pad_multiple}: need a positive integer")
        if not 0 <= self.foreground_min_fraction < 1:
            raise AqcfError(
                f"foreground minimum fraction {self.foreground_min_fraction}: need a value in [0, 1)"
            )

    @classmethod
    def default(cls, modality: str, **overrides) -> PreprocessSettings:
        """The paper's settings for ``modality`` (:data:`DEFAULT_ORIENTATIONS`, :data:`DEFAULT_WINDOWS`).

        Any other name (a further MRI cohort such as ``"t2"``) gets the MRI defaults.
        """
        modality = check_name(modality)
        values = {
            "modality": modality,
            "orientation": DEFAULT_ORIENTATIONS.get(modality, DEFAULT_ORIENTATIONS[MRI]),
            "window": DEFAULT_WINDOWS.get(modality, DEFAULT_WINDOWS[MRI]),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def threshold(self) -> float:
        """The body threshold actually used (the window floor unless set)."""
        return self.window[0] if self.foreground_threshold is None else float(self.foreground_threshold)

    def to_dict(self) -> dict:
        """Plain JSON-able values."""
        return dataclasses.asdict(self) | {"window": list(self.window), "spacing": list(self.spacing)}

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessSettings:
        """Inverse of :meth:`to_dict`."""
        return cls(**values)

    def hash(self) -> str:
        """Twelve hex digits identifying these settings and the pipeline version."""
        text = json.dumps({"version": PIPELINE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def foreground_box(body: np.ndarray, min_fraction: float = 1e-3) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box of a body mask, ignoring slices with too few body voxels.

    Args:
        body: Boolean mask (X, Y, Z).
        min_fraction: Along each axis, keep the slices whose body fraction is at least this.

    Returns:
        ``(start, stop)`` voxel indices per axis (stop exclusive); empty (``start == stop``) when no
        slice qualifies.
    """
    start, stop = [], []
    for axis in range(body.ndim):
        others = tuple(a for a in range(body.ndim) if a != axis)
        counts = body.sum(axis=others)
        plane = body.size // body.shape[axis]
        keep = np.flatnonzero(counts >= max(1.0, min_fraction * plane))
        start.append(int(keep[0]) if keep.size else 0)
        stop.append(int(keep[-1]) + 1 if keep.size else 0)
    return tuple(start), tuple(stop)


def load_scan(path: Path, kind: str):
    """A scan (``kind="image"``) or label map read once, completely, through the input gate.

    :func:`aqcf.data.gate.load_volume` reads NIfTI with nibabel to the end of the file (SimpleITK,
    TorchIO's reader, would fill a truncated file with zeros) and refuses anything but one 3D volume
    with a valid affine; a scan must also be finite (a label's values are checked by the caller).
    """
    import torch
    import torchio as tio

    volume = gate.load_volume(path, finite=kind == "image")
    array = volume.array
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        array = array.astype(np.int64)  # torch has no uint16 / uint32 tensors
    tensor = torch.from_numpy(array)[None]  # nibabel's (Fortran) order kept: no copy of the volume
    return (tio.ScalarImage if kind == "image" else tio.LabelMap)(tensor=tensor, affine=volume.affine)


def label_mapping(labels, where: str = "labels") -> dict[int, int]:
    """A cohort's label convention as ``{mask value: class}``, checked.

    Args:
        labels: ``None`` (:data:`DEFAULT_LABELS`), a mapping or ``(value, class)`` pairs. Keys are
            integers, or their strings (a YAML or JSON round trip); classes are 0, 1, 2 or their names
            (``background``, ``liver``, ``tumor``).
        where: What to call the mapping in the message (``data.cohorts[2].labels``).

    Raises:
        AqcfError: Not a mapping, a key that is not an integer or is given twice, or a class outside
            {0, 1, 2}.
    """
    if labels is None:
        return dict(DEFAULT_LABELS)
    pairs = None
    if not isinstance(labels, str):
        with contextlib.suppress(TypeError):
            pairs = list(labels.items()) if hasattr(labels, "items") else [tuple(pair) for pair in labels]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise AqcfError(f"{where} {labels!r}: need a mapping from mask values to classes, e.g. {{0: 0, 1: 2, 2: 1}}")
    mapping = {}
    for value, target in pairs:
        try:
            key = int(str(value).strip())
        except ValueError:
            key = None
        cls = CLASS_NAMES.index(target) if target in CLASS_NAMES else target
        if key is None:
            raise AqcfError(f"{where}: mask value {value!r} is not an integer")
        if key in mapping:
            raise AqcfError(f"{where}: mask value {key} is given twice")
        if isinstance(cls, bool) or cls not in range(len(CLASS_NAMES)):
            raise AqcfError(
                f"{where}: mask value {key} maps to {target!r}; classes are 0, 1, 2 ({', '.join(CLASS_NAMES)})"
            )
        mapping[key] = int(cls)
    return dict(sorted(mapping.items()))


def map_labels(path: str | Path, array: np.ndarray, labels: dict[int, int], cohort: str = "the") -> np.ndarray:
    """A label map's voxels in the project's classes: ``labels[value]`` for each voxel.

    Args:
        path: The label file, for the message.
        array: Its voxels, any numeric dtype (kept, and its memory layout).
        labels: ``{mask value: class}`` (:func:`label_mapping`).
        cohort: The cohort's name, for the message.

    Raises:
        AqcfError: A value the mapping does not cover is present (non-integers and NaN included).
    """
    uncovered = [v for v in np.unique(array).tolist() if not (float(v).is_integer() and int(v) in labels)]
    if uncovered:
        shown = ", ".join(f"{v:g}" for v in uncovered[:5]) + (", ..." if len(uncovered) > 5 else "")
        raise AqcfError(f"{path}: label values {{{shown}}} not covered by {cohort} cohort's labels {labels}")
    mapped = np.zeros_like(array)
    for value, cls in labels.items():
        if cls:
            mapped[array == value] = cls
    return mapped


def preprocess_subject(
    image_path: Path,
    label_path: Path | None,
    settings: PreprocessSettings,
    tolerance_mm: float = SAME_GRID_TOLERANCE_MM,
    labels: dict[int, int] | None = None,
):
    """The pipeline on one scan (and its label, mapped by ``labels``; see the module docstring).

    Args:
        image_path: The scan.
        label_path: Its label map on the same grid (within ``tolerance_mm``), or ``None``.
        settings: The modality's preprocessing.
        tolerance_mm: How far the label's grid may lie from the scan's.
        labels: The cohort's ``{mask value: class}`` (:func:`label_mapping`); ``None``: the identity.

    Returns:
        ``(subject, record)``: a TorchIO subject with ``image`` (and ``label``) on the preprocessed grid,
        and the JSON-able geometry record of :func:`preprocess_image`.
    """
    import torch
    import torchio as tio

    subject, record = _read_subject(image_path, label_path, settings, tolerance_mm, labels)
    subject = tio.ToOrientation(settings.orientation)(subject)
    start, stop = _crop_box(subject, image_path, settings, record)
    shape = subject.spatial_shape
    record["reoriented_shape"] = [int(n) for n in shape]
    record["crop_start"], record["crop_stop"] = list(start), list(stop)
    cropping = [n for a, b, s in zip(start, stop, shape, strict=True) for n in (a, s - b)]
    subject = tio.Crop(cropping)(subject)
    # Resampling int16 with linear interpolation in ITK would round to integers: use float32.
    subject["image"].set_data(subject["image"].data.to(torch.float32))
    subject = _resample_window_pad(subject, settings)
    record.update(_geometry("preprocessed", subject["image"]))
    record["preprocessed_spacing"] = list(settings.spacing)  # the target, not the affine's rounding
    return subject, record


def _geometry(prefix: str, image) -> dict:
    """``<prefix>_shape``, ``_affine``, ``_spacing`` and ``_orientation`` of a TorchIO image, JSON-able."""
    import nibabel as nib

    return {
        f"{prefix}_shape": [int(n) for n in image.spatial_shape],
        f"{prefix}_affine": np.asarray(image.affine).tolist(),
        f"{prefix}_spacing": [float(s) for s in image.spacing],
        f"{prefix}_orientation": "".join(nib.aff2axcodes(image.affine)),
    }


def _read_subject(
    image_path: Path,
    label_path: Path | None,
    settings: PreprocessSettings,
    tolerance_mm: float,
    labels: dict[int, int] | None,
):
    """Step 0: the scan (and its label, mapped and checked) as a TorchIO subject, and the original geometry.

    Returns:
        ``(subject, record)``; the record holds the ``original_*`` geometry and, with a label,
        ``has_tumor``.
    """
    import torch
    import torchio as tio

    image = load_scan(image_path, "image")
    subject = tio.Subject(image=image)
    record = _geometry("original", image)
    if label_path is None:
        return subject, record
    label = load_scan(label_path, "label")
    if labels is not None and labels != DEFAULT_LABELS:
        label.set_data(torch.from_numpy(map_labels(label_path, label.data.numpy(), labels, settings.modality)))
    check_same_grid(
        image_path,
        (image.spatial_shape, image.affine),
        label_path,
        (label.spatial_shape, label.affine),
        tolerance_mm,
    )
    values = check_label_values(label_path, label.data)
    record["has_tumor"] = bool(2 in values)
    subject.add_image(label, "label")
    # Within tolerance the grids are equal; copying removes rounding differences TorchIO rejects.
    return tio.CopyAffine("image")(subject), record


def _crop_box(subject, image_path: Path, settings: PreprocessSettings, record: dict):
    """Step 2's box on the reoriented grid: the body's (:func:`foreground_box`), widened to every labelled voxel.

    Sets ``record["crop_extended_for_label"]``.

    Returns:
        ``(start, stop)`` voxel indices per axis (stop exclusive).

    Raises:
        AqcfError: No voxel above the body threshold.
    """
    body = subject["image"].data[0].numpy() > settings.threshold
    start, stop = foreground_box(body, settings.foreground_min_fraction)
    if not all(b > a for a, b in zip(start, stop, strict=True)):
        raise AqcfError(
            f"{image_path}: no voxel above {settings.threshold:g} (the body threshold); is this a "
            f"{settings.modality.upper()} scan, and is the window {settings.window} right?"
        )
    record["crop_extended_for_label"] = False
    if "label" in subject:
        labelled = np.argwhere(subject["label"].data[0].numpy() > 0)
        if labelled.size:
            wider_start = np.minimum(start, labelled.min(axis=0))
            wider_stop = np.maximum(stop, labelled.max(axis=0) + 1)
            record["crop_extended_for_label"] = bool((wider_start < start).any() or (wider_stop > stop).any())
            start, stop = tuple(int(x) for x in wider_start), tuple(int(x) for x in wider_stop)
    return start, stop


def _resample_window_pad(subject, settings: PreprocessSettings):
    """Steps 3-5: resample to ``spacing``, window to [0, 1], zero-pad to a multiple of ``pad_multiple``."""
    import torchio as tio

    low, high = settings.window
    transform = tio.Compose(
        [
            tio.Resample(settings.spacing),
            tio.Clamp(out_min=low, out_max=high),
            tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=(low, high)),
            tio.EnsureShapeMultiple(int(settings.pad_multiple), method="pad"),
        ]
    )
    return transform(subject)


def preprocess_image(image_path: str | Path, settings: PreprocessSettings):
    """Preprocess one scan without a label (inference).

    Args:
        image_path: The scan (NIfTI, or anything TorchIO reads).
        settings: The modality's settings (those the model was trained with).

    Returns:
        ``(tensor, record)``: the image as a float32 tensor (1, X, Y, Z) in [0, 1] on the
        preprocessed grid, and a JSON-able dict describing both grids (``original_shape``,
        ``original_affine``, ``preprocessed_shape``, ``preprocessed_affine``, crop box, ...) that
        :func:`restore_to_original` needs.

    Raises:
        AqcfError: The file cannot be read, is not single-channel 3D, or has no voxel above the body
            threshold.
    """
    subject, record = preprocess_subject(Path(image_path), None, settings)
    return subject["image"].data.float(), record


def restore_to_original(label_array, record: dict) -> np.ndarray:
    """Map a label map from the preprocessed grid back to the original scan's voxel grid.

    Args:
        label_array: Integer labels (X, Y, Z) on the preprocessed grid (numpy array or tensor).
        record: The record :func:`preprocess_image` (or the cache manifest) gave for this scan.

    Returns:
        uint8 labels with the original image's exact shape, in its stored axis order; voxels outside
        the preprocessed field of view (cropped away) are 0. Sampling is nearest neighbour in world
        coordinates, so it undoes reorientation, crop, resampling and padding at once.
    """
    import torch
    import torchio as tio

    labels = torch.as_tensor(np.asarray(label_array)).to(torch.int16)
    expected = tuple(record["preprocessed_shape"])
    if tuple(labels.shape) != expected:
        raise AqcfError(
            f"label map of shape {tuple(labels.shape)} does not match the preprocessed shape {expected}"
        )
    label_map = tio.LabelMap(
        tensor=labels[None], affine=np.asarray(record["preprocessed_affine"], dtype=float)
    )
    target = (
        tuple(int(n) for n in record["original_shape"]),
        np.asarray(record["original_affine"], dtype=float),
    )
    restored = tio.Resample(target, label_interpolation="nearest")(label_map)
    return restored.data[0].numpy().astype(np.uint8)


def _parser() -> argparse.ArgumentParser:  # long: the flat list of the verb's flags
    from aqcf.data.cache import VERIFY_MODES

    p = ArgumentParser(
        prog="aqcf preprocess",
        description="Preprocess a cohort into a cache folder (reorient, crop to the body, resample, window, "
        "pad). Reuses a finished cache with the same settings and files.",
    )
    p.add_argument("--data", required=True, help="cohort folder")
    p.add_argument("--format", required=True, help="cohort layout: lits, atlas or nnunet")
    p.add_argument("--modality", required=True, metavar="NAME",
                   help="ct, mri or a further cohort's name (t2, ...: MRI defaults); names the cache and the fold file")
    p.add_argument("--cache", required=True, help="cache folder (receives <name>-<key>/)")
    p.add_argument("--name", help="cache folder prefix (default MODALITY-FORMAT)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default 0: this process)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="mm (default 1 1 1)")
    p.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="intensities mapped to [0, 1] (default CT -16 176, MRI and other names 74 511)",
    )
    p.add_argument("--orientation", help="target axis codes (default CT RAS, MRI and other names LAS)")
    p.add_argument("--pad-multiple", type=int, help="pad sizes to a multiple of this (default 16)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave broken cases out of the cache (listed in its manifest and on stderr) instead of stopping",
    )
    p.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default="checksum",
        help="how an existing cache's files are checked before reuse (default checksum: reads every file)",
    )
    p.add_argument("--n-folds", type=int, default=5, help="cross-validation folds of the splits file (default 5)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument(
        "--splits-dir",
        help="folder of <modality>/splits.json (default --cache, where aqcf fit with data.cache_dir = --cache "
        "reads it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """``aqcf preprocess``: returns the exit code."""
    from aqcf.data.cache import preprocess_cohort
    from aqcf.data.splits import load_or_create_splits

    args = _parser().parse_args(argv)
    settings = PreprocessSettings.default(
        args.modality,
        spacing=tuple(args.spacing) if args.spacing else None,
        window=tuple(args.window) if args.window else None,
        orientation=args.orientation,
        pad_multiple=args.pad_multiple,
    )
    cases = read_cohort(args.data, args.format, args.modality)
    manifest = preprocess_cohort(
        cases,
        settings,
        args.cache,
        workers=args.workers,
        name=args.name or f"{settings.modality}-{args.format.lower()}",
        progress=not args.no_progress,
        verify=args.verify,
        skip_bad=args.skip_bad,
    )
    with_tumor = sum(manifest.has_tumor)
    count = len(manifest.entries)
    skipped = f", {len(manifest.skipped)} broken cases skipped" if manifest.skipped else ""
    print(f"{manifest.folder}: {count} cases ({with_tumor} with tumor){skipped}, settings {settings.hash()}")
    # the fold file where the data module looks for it (UnpairedDataModule._splits_path), made as it
    # makes it; an existing one is read and checked against these cases, never redrawn
    splits_path = Path(args.splits_dir or args.cache) / settings.modality / "splits.json"
    if count < args.n_folds:
        print(f"{splits_path}: not written, {count} cases cannot fill {args.n_folds} folds")
        return 0
    load_or_create_splits(splits_path, manifest.ids, manifest.has_tumor, n_folds=args.n_folds, seed=args.split_seed)
    print(f"{splits_path}: {args.n_folds} folds stratified by tumor presence")
    return 0
