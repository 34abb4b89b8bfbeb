"""Modality-specific preprocessing (paper §3.1.2), its inverse, and the per-cohort cache.

One scan goes through, in this order (TorchIO transforms):

1. ``ToOrientation``: CT to RAS, MRI to LAS (axis permutation and flips only, nothing resampled).
2. Foreground crop, computed from the image alone so that unlabeled scans at inference are cropped by
   the same rule: voxels above the window floor (the voxels the window does not send to 0) form the
   body mask; along each axis the crop keeps the slices holding at least ``foreground_min_fraction``
   of body voxels, which ignores isolated noise specks. Cropping before resampling gives the same
   region as after and touches fewer voxels. During cohort preprocessing the box is widened to
   contain every labelled voxel (the manifest records when that happened).
3. ``Resample`` to ``spacing`` (default 1×1×1 mm): linear for the image, nearest neighbour for the
   label.
4. ``Clamp`` to the window and ``RescaleIntensity`` to [0, 1]: CT [-16, 176] HU, MRI [74, 511].
5. ``EnsureShapeMultiple``: zero-pad (symmetrically) every axis to a multiple of ``pad_multiple`` (16,
   for the network's four halvings).

:func:`preprocess_image` does this for one unlabeled scan and returns a record of the geometry;
:func:`restore_to_original` maps a label map on the preprocessed grid back onto the original image's
voxel grid (nearest neighbour), which is how ``aqcf segment`` writes its masks.

:func:`preprocess_cohort` runs the pipeline once per cohort and settings into
``cache_dir/<name>-<key>/`` with a ``manifest.json`` written last; ``key`` hashes the settings, the
pipeline version and the case list (paths, sizes, modification times), so a change of any of them
makes a new cache and never reuses a stale one. A cohort whose masks code the classes otherwise
declares its ``labels`` (:func:`label_mapping`); every label map is mapped right after it is read,
before the label check, and a mapping other than the identity is part of the key.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from aqcf.constants import CLASS_NAMES, CT, MRI, check_name
from aqcf.data import gate
from aqcf.data.cohorts import (
    AFFINE_TOLERANCE_MM,
    Case,
    check_label_values,
    check_same_grid,
    read_cohort,
    validate_case,
)
from aqcf.errors import AqcfError, ArgumentParser
from aqcf.io import save_nifti_atomic, write_json_atomic

__all__ = [
    "PIPELINE_VERSION",
    "PreprocessSettings",
    "Manifest",
    "foreground_box",
    "preprocess_image",
    "preprocess_case",
    "file_digest",
    "check_cached_files",
    "CACHED_FILES",
    "VERIFY_MODES",
    "restore_to_original",
    "preprocess_cohort",
    "cohort_key",
    "DEFAULT_LABELS",
    "label_mapping",
    "map_labels",
    "main",
]

PIPELINE_VERSION = 2
"""Bumped whenever the pipeline's output changes for the same settings, so old caches are not reused.

2: the cache also holds each case's label locations (``locations/<id>.npz``) and records every cached
file's size and checksum."""

MANIFEST = "manifest.json"
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
        """The paper's settings for ``modality`` (CT: RAS, [-16, 176] HU; MRI: LAS, [74, 511]).

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


def _load(path: Path, kind: str):
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


def _run(
    image_path: Path,
    label_path: Path | None,
    settings: PreprocessSettings,
    tolerance_mm: float = AFFINE_TOLERANCE_MM,
    labels: dict[int, int] | None = None,
):
    """The pipeline on one scan (and its label, mapped by ``labels``). Returns ``(subject, record)``."""
    import nibabel as nib
    import torch
    import torchio as tio

    image = _load(image_path, "image")
    subject = tio.Subject(image=image)
    record = {
        "original_shape": [int(n) for n in image.spatial_shape],
        "original_affine": np.asarray(image.affine).tolist(),
        "original_spacing": [float(s) for s in image.spacing],
        "original_orientation": "".join(nib.aff2axcodes(image.affine)),
    }
    has_label = label_path is not None
    if has_label:
        label = _load(label_path, "label")
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
        subject = tio.CopyAffine("image")(subject)

    subject = tio.ToOrientation(settings.orientation)(subject)
    body = subject["image"].data[0].numpy() > settings.threshold
    start, stop = foreground_box(body, settings.foreground_min_fraction)
    if not all(b > a for a, b in zip(start, stop, strict=True)):
        raise AqcfError(
            f"{image_path}: no voxel above {settings.threshold:g} (the body threshold); is this a "
            f"{settings.modality.upper()} scan, and is the window {settings.window} right?"
        )
    record["crop_extended_for_label"] = False
    if has_label:
        labelled = np.argwhere(subject["label"].data[0].numpy() > 0)
        if labelled.size:
            wider_start = np.minimum(start, labelled.min(axis=0))
            wider_stop = np.maximum(stop, labelled.max(axis=0) + 1)
            record["crop_extended_for_label"] = bool((wider_start < start).any() or (wider_stop > stop).any())
            start, stop = tuple(int(x) for x in wider_start), tuple(int(x) for x in wider_stop)
    shape = subject.spatial_shape
    record["reoriented_shape"] = [int(n) for n in shape]
    record["crop_start"], record["crop_stop"] = list(start), list(stop)
    cropping = [n for a, b, s in zip(start, stop, shape, strict=True) for n in (a, s - b)]
    subject = tio.Crop(cropping)(subject)
    # Resampling int16 with linear interpolation in ITK would round to integers: use float32.
    subject["image"].set_data(subject["image"].data.to(torch.float32))

    low, high = settings.window
    transform = tio.Compose(
        [
            tio.Resample(settings.spacing),
            tio.Clamp(out_min=low, out_max=high),
            tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=(low, high)),
            tio.EnsureShapeMultiple(int(settings.pad_multiple), method="pad"),
        ]
    )
    subject = transform(subject)
    record["preprocessed_shape"] = [int(n) for n in subject.spatial_shape]
    record["preprocessed_affine"] = np.asarray(subject["image"].affine).tolist()
    record["preprocessed_spacing"] = list(settings.spacing)
    record["preprocessed_orientation"] = "".join(nib.aff2axcodes(subject["image"].affine))
    return subject, record


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
    subject, record = _run(Path(image_path), None, settings)
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


def _atomic_save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    save_nifti_atomic(img, path)


def file_digest(path: str | Path, chunk: int = 1 << 22) -> dict:
    """``{"size": bytes, "crc32": checksum}`` of a file (what the manifest records per cached file).

    CRC-32 finds accidental damage (it is not meant against tampering) and is fast: 2.2 GB/s on this
    2-core machine, against 0.36–0.85 GB/s for BLAKE2b, MD5, SHA-1 or SHA-256.
    """
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            crc = zlib.crc32(block, crc)
    return {"size": Path(path).stat().st_size, "crc32": f"{crc:08x}"}


CACHED_FILES = ("image", "label", "locations")
"""The manifest keys of an entry's cached files (paths relative to the cache folder)."""
VERIFY_MODES = ("size", "checksum")


def check_cached_files(entry: dict, folder: str | Path, verify: str = "size") -> list[str]:
    """Problems with a case's cached files: missing, another size, or (``verify="checksum"``) other bytes.

    Args:
        entry: The case's manifest entry (paths relative to ``folder``).
        folder: The cache folder.
        verify: ``"size"`` (a stat per file: finds truncation) or ``"checksum"`` (reads every byte).

    Returns:
        One line per damaged file, naming it; empty when the case is intact.
    """
    if verify not in VERIFY_MODES:
        raise AqcfError(f"cache verification {verify!r}: expected one of {VERIFY_MODES}")
    problems = []
    for key in CACHED_FILES:
        if entry.get(key) is None:
            continue
        path = Path(folder) / entry[key]
        expected = entry.get("files", {}).get(key)
        if not path.is_file():
            problems.append(f"{path}: listed in the cache but missing")
        elif expected is None:
            problems.append(f"{path}: no size or checksum recorded (an older cache)")
        elif path.stat().st_size != expected["size"]:
            size = path.stat().st_size
            problems.append(f"{path}: {size} bytes, {expected['size']} when cached (truncated or replaced)")
        elif verify == "checksum" and file_digest(path)["crc32"] != expected.get("crc32"):
            problems.append(f"{path}: checksum differs from the one recorded when cached (damaged)")
    return problems


def preprocess_case(
    case: Case, settings: PreprocessSettings, folder: str | Path, labels: dict[int, int] | None = None
) -> dict:
    """Validate and preprocess one case into a cache folder (its label map mapped by ``labels``).

    Writes ``images/<id>.nii`` (float32), ``labels/<id>.nii`` (uint8), ``locations/<id>.npz`` (a sample
    of each label's voxel coordinates, :func:`aqcf.data.patches.class_locations`) and last
    ``records/<id>.json`` (the manifest entry), each atomically, so a record exists only for a complete
    case. The NIfTI files are uncompressed and unscaled, so training reads patches through a memory map.

    Returns:
        The manifest entry: ``id``, ``modality``, ``source_image``, ``source_label``, ``image``,
        ``label`` and ``locations`` (paths relative to ``folder``), ``files`` (size and checksum of each
        cached file), ``has_tumor``, ``voxel_counts`` (background, liver, tumor on the preprocessed
        grid) and the geometry of :func:`preprocess_image`.
    """
    import torchio  # noqa: F401  (a fresh worker's import time is not the case's)

    from aqcf.data.patches import class_locations, save_locations

    folder = Path(folder)
    start = time.perf_counter()
    # Headers first (cheap, clear messages); label values are checked on the voxels loaded below.
    validate_case(case, check_values=False)
    label = None if case.label is None else Path(case.label)
    subject, record = _run(Path(case.image), label, settings, labels=labels)
    affine = np.asarray(subject["image"].affine)
    entry = {
        "id": case.id,
        "modality": case.modality,
        "source_image": str(case.image),
        "source_label": None if case.label is None else str(case.label),
        "image": f"images/{case.id}.nii",
        "label": None if case.label is None else f"labels/{case.id}.nii",
        "locations": None if case.label is None else f"locations/{case.id}.npz",
        "has_tumor": record.pop("has_tumor", None),
    }
    _atomic_save_nifti(subject["image"].data[0].numpy().astype(np.float32), affine, folder / entry["image"])
    if case.label is not None:
        label = subject["label"].data[0].numpy().astype(np.uint8)
        entry["voxel_counts"] = np.bincount(label.ravel(), minlength=3)[:3].tolist()
        _atomic_save_nifti(label, affine, folder / entry["label"])
        save_locations(folder / entry["locations"], class_locations(label, seed=case.id))
    entry["files"] = {key: file_digest(folder / entry[key]) for key in CACHED_FILES if entry[key] is not None}
    entry.update(record)
    entry["seconds"] = round(time.perf_counter() - start, 3)
    write_json_atomic(folder / "records" / f"{case.id}.json", entry, indent=1)
    return entry


def _fingerprint(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cohort_key(cases: Sequence[Case], settings: PreprocessSettings, labels: dict[int, int] | None = None) -> str:
    """Twelve hex digits identifying the settings, the pipeline version, the exact input files and the labels.

    The case list enters with each file's absolute path, size and modification time, so replacing or
    editing a file also gives a new key. ``labels`` (the cohort's label convention) enters only when it
    is not :data:`DEFAULT_LABELS`, so caches made before cohorts declared one keep their keys.
    """
    files = [
        [
            c.id,
            c.modality,
            _fingerprint(Path(c.image)),
            None if c.label is None else _fingerprint(Path(c.label)),
        ]
        for c in cases
    ]
    identity = {"settings": settings.hash(), "cases": files}
    if labels is not None and labels != DEFAULT_LABELS:
        identity["labels"] = [[int(value), int(cls)] for value, cls in sorted(labels.items())]
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Manifest:
    """A complete cohort cache.

    Attributes:
        folder: ``cache_dir/<name>-<key>``.
        key: The cohort key (:func:`cohort_key`).
        settings: The preprocessing settings.
        entries: One dict per case (see :func:`preprocess_case`) with ``image``, ``label`` and
            ``locations`` turned into absolute paths.
        skipped: Broken cases left out by ``skip_bad`` (``{"id", "image", "label", "problem"}``).
    """

    folder: Path
    key: str
    settings: PreprocessSettings
    entries: list[dict]
    skipped: list[dict] = dataclasses.field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.entries]

    @property
    def has_tumor(self) -> list[bool]:
        return [bool(e["has_tumor"]) for e in self.entries]

    def by_id(self) -> dict[str, dict]:
        return {e["id"]: e for e in self.entries}

    @classmethod
    def load(cls, folder: str | Path, verify: str = "size") -> Manifest:
        """Read ``folder/manifest.json`` and check the cached files it lists.

        Args:
            folder: The cache folder.
            verify: ``"size"`` or ``"checksum"`` (:func:`check_cached_files`).

        Raises:
            AqcfError: The manifest is missing or unreadable, or a file it lists is missing or damaged
                (every damaged file is named).
        """
        folder = Path(folder)
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
            settings = PreprocessSettings.from_dict(data["settings"])
            entries = data["cases"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise AqcfError(f"{path}: not a readable cache manifest ({err})") from err
        problems = [p for entry in entries for p in check_cached_files(entry, folder, verify)]
        if problems:
            raise AqcfError(f"{path}: damaged cache ({' | '.join(problems)}); delete {folder} to rebuild")
        for entry in entries:
            for key in CACHED_FILES:
                if entry.get(key) is not None:
                    entry[key] = str(folder / entry[key])
        return cls(
            folder=folder, key=data["key"], settings=settings, entries=entries, skipped=data.get("skipped", [])
        )


def _read_records(folder: Path, cases: Sequence[Case], verify: str) -> tuple[dict[str, dict], list[str]]:
    """The intact cached cases of a cache folder (finished or not), and a line per damaged file found."""
    records: dict[str, dict] = {}
    damaged: list[str] = []
    for case in cases:
        path = folder / "records" / f"{case.id}.json"
        if not path.is_file():
            continue
        try:
            entry = json.loads(path.read_text())
        except ValueError:
            damaged.append(f"{path}: unreadable record")
            continue
        problems = check_cached_files(entry, folder, verify)
        if problems:
            damaged += problems
        else:
            records[case.id] = entry
    return records, damaged


def preprocess_cohort(
    cases: Sequence[Case],
    settings: PreprocessSettings,
    cache_dir: str | Path,
    workers: int = 0,
    name: str | None = None,
    progress: bool = True,
    verify: str = "size",
    skip_bad: bool = False,
    labels: dict[int, int] | None = None,
) -> Manifest:
    """Preprocess a cohort once into ``cache_dir/<name>-<key>/`` and return its manifest.

    A finished cache (``manifest.json`` present) is reused after checking its files (``verify``); a
    damaged cached case (truncated, or other bytes under ``verify="checksum"``) is said, preprocessed
    again from its source and the manifest rewritten. A cache left incomplete by a killed run resumes:
    intact cached cases are kept, the others are processed, and the manifest is written last, so a
    killed run's cache is never used as finished. Each case is validated as it is processed; every
    broken case is collected, and the run stops without a manifest naming all of them, unless
    ``skip_bad`` leaves them out (listed in the manifest's ``skipped`` and said on stderr).

    Args:
        cases: The cohort (one modality).
        settings: The modality's preprocessing settings.
        cache_dir: Parent folder of the caches.
        workers: Processes to use (0: this process). They are spawned, so a script calling this
            with ``workers > 0`` must do so under ``if __name__ == "__main__":``.
        name: Prefix of the cache folder (default: the modality).
        progress: Show a progress bar over cases.
        verify: How a reused cache's files are checked: ``"size"`` (a stat per file) or
            ``"checksum"`` (reads them all).
        skip_bad: Leave broken cases out instead of stopping.
        labels: The cohort's ``{mask value: class}`` (:func:`label_mapping`), applied to every label map
            as it is read; ``None``: :data:`DEFAULT_LABELS`. Part of the key unless the default.

    Returns:
        The :class:`Manifest`, entries in the order of ``cases`` (less the skipped ones).

    Raises:
        AqcfError: No case, duplicate ids, a case of another modality, broken cases (every one named),
            or a cache folder that is not a folder.
    """
    import sys

    from tqdm.auto import tqdm

    cases = list(cases)
    if not cases:
        raise AqcfError(f"{cache_dir}: no case to preprocess")
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise AqcfError(f"case id {duplicate!r} appears twice in the cohort")
    for case in cases:
        if case.modality != settings.modality:
            raise AqcfError(
                f"{case.image}: a {case.modality} case given to {settings.modality} preprocessing"
            )
    for parent in (Path(cache_dir), *Path(cache_dir).parents):
        if parent.exists() and not parent.is_dir():
            raise AqcfError(f"{parent}: the cache folder's path holds a file, not a folder")

    key = cohort_key(cases, settings, labels)
    folder = Path(cache_dir) / f"{name or settings.modality}-{key}"
    manifest_path = folder / MANIFEST
    records, damaged = _read_records(folder, cases, verify)
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text())
        except ValueError:
            previous = {}
        skipped_ids = {s["id"] for s in previous.get("skipped", [])}
        if not damaged and all(c.id in records or c.id in skipped_ids for c in cases):
            return Manifest.load(folder, verify="size")
        for line in damaged:
            print(f"aqcf: {line}; preprocessing the case again", file=sys.stderr)
        manifest_path.unlink()

    todo = [c for c in cases if c.id not in records]
    failures: dict[str, str] = {}
    with tqdm(
        total=len(cases),
        initial=len(cases) - len(todo),
        desc=f"preprocess {folder.name}",
        unit="case",
        disable=not progress,
    ) as bar:
        if workers > 0 and len(todo) > 1:
            # spawn, not fork: forking a process that has started torch/OpenMP threads can deadlock.
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                    futures = {pool.submit(preprocess_case, case, settings, folder, labels): case for case in todo}
                    for future in as_completed(futures):
                        try:
                            entry = future.result()
                            records[entry["id"]] = entry
                        except AqcfError as err:
                            failures[futures[future].id] = str(err)
                        bar.update(1)
            except BrokenProcessPool as err:
                raise AqcfError(
                    f"{folder}: a preprocessing worker process died (out of memory, or a script that starts "
                    "workers outside `if __name__ == '__main__':`); retry with fewer workers or workers=0"
                ) from err
        else:
            for case in todo:
                try:
                    records[case.id] = preprocess_case(case, settings, folder, labels)
                except AqcfError as err:
                    failures[case.id] = str(err)
                bar.update(1)

    skipped = [
        {"id": c.id, "image": str(c.image), "label": None if c.label is None else str(c.label),
         "problem": failures[c.id]}
        for c in cases
        if c.id in failures
    ]
    if skipped and not skip_bad:
        raise AqcfError(
            f"{len(skipped)} of {len(cases)} cases cannot be used, no cache written (fix them, or pass "
            f"--skip-bad to leave them out): " + " | ".join(s["problem"] for s in skipped)
        )
    for item in skipped:
        print(f"aqcf: skipped case {item['id']}: {item['problem']}", file=sys.stderr)
    if len(skipped) == len(cases):
        raise AqcfError(f"{folder}: every case of the cohort is broken; nothing to cache")
    manifest = {
        "key": key,
        "settings_hash": settings.hash(),
        "pipeline_version": PIPELINE_VERSION,
        "settings": settings.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cases": [records[c.id] for c in cases if c.id in records],
        "skipped": skipped,
    }
    if labels is not None and labels != DEFAULT_LABELS:
        manifest["labels"] = {str(value): cls for value, cls in labels.items()}
    write_json_atomic(manifest_path, manifest, indent=1)
    return Manifest.load(folder)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="aqcf preprocess",
        description="Preprocess a cohort into a cache folder (reorient, crop to the body, resample, window, "
        "pad). Reuses a finished cache with the same settings and files.",
    )
    p.add_argument("--data", required=True, help="cohort folder")
    p.add_argument("--format", required=True, help="cohort layout: lits, atlas or nnunet")
    p.add_argument("--modality", required=True, choices=[CT, MRI])
    p.add_argument("--cache", required=True, help="cache folder (receives <name>-<key>/)")
    p.add_argument("--name", help="cache folder prefix (default MODALITY-FORMAT)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default 0: this process)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="mm (default 1 1 1)")
    p.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="intensities mapped to [0, 1] (default CT -16 176, MRI 74 511)",
    )
    p.add_argument("--orientation", help="target axis codes (default CT RAS, MRI LAS)")
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
    from aqcf.data.splits import load_or_create_splits

    splits_path = Path(args.splits_dir or args.cache) / settings.modality / "splits.json"
    if count < args.n_folds:
        print(f"{splits_path}: not written, {count} cases cannot fill {args.n_folds} folds")
        return 0
    load_or_create_splits(splits_path, manifest.ids, manifest.has_tumor, n_folds=args.n_folds, seed=args.split_seed)
    print(f"{splits_path}: {args.n_folds} folds stratified by tumor presence")
    return 0
