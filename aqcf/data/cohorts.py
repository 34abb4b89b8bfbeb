"""Readers that turn a data set folder into a list of :class:`Case` records, and their validation.

Three layouts are understood: ``lits`` (LiTS 2017, case ids ``lits-N``), ``atlas`` (ATLAS, Quinton et
al. 2023, case ids ``atlas-N``) and ``nnunet`` (the nnU-Net v2 raw or Medical Segmentation Decathlon
layout, case ids the file names' case part). Each tree, and what is searched or ignored:
docs/data.md, *Cohort layouts*.

Readers only look at file names. :func:`validate_case` opens the files and checks what training
relies on through the input gate, :mod:`aqcf.data.gate`;
preprocessing runs it once per case, so it is not repeated at every read.

Every problem raises :class:`~aqcf.errors.AqcfError` with a one-line message naming the file.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aqcf.constants import CT, MRI, check_modality, check_name
from aqcf.data import gate
from aqcf.data.gate import SAME_GRID_TOLERANCE_MM
from aqcf.errors import AqcfError

__all__ = [
    "Case",
    "READERS",
    "natural_key",
    "read_lits",
    "read_atlas",
    "read_nnunet",
    "read_cohort",
    "register_reader",
    "read_geometry",
    "read_label_array",
    "validate_case",
]

_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_LITS_LABEL = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")
_ATLAS_IMAGE = re.compile(r"^im(\d+)\.nii(\.gz)?$")
_ATLAS_LABEL = re.compile(r"^lb(\d+)\.nii(\.gz)?$")
_NNUNET_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


@dataclass(frozen=True)
class Case:
    """One scan of a cohort.

    Attributes:
        id: Identifier unique within the cohort (``lits-3``, ``atlas-12``, or the nnU-Net case name);
            it names the preprocessed files and the entries of ``splits.json``.
        modality: ``"ct"`` or ``"mri"``.
        image: Path of the image file (NIfTI, or anything TorchIO reads).
        label: Path of the label map (0 background, 1 liver, 2 tumor), or ``None`` when unlabeled.
    """

    id: str
    modality: str
    image: Path
    label: Path | None


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers by value (``im9`` before ``im10``)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _check_folder(root: str | Path) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise AqcfError(f"{path}: no such folder")
    return path


def _visible_files(root: Path) -> Iterable[Path]:
    # macOS archives carry "._name" resource forks beside every file (the MSD tarballs do).
    for path in root.rglob("*"):
        if not path.name.startswith(".") and path.is_file():
            yield path


def _index_by_number(files: Iterable[Path], pattern: re.Pattern) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in files:
        match = pattern.match(path.name)
        if match is None:
            continue
        number = int(match.group(1))
        if number in found:
            raise AqcfError(f"{path}: case {number} appears twice (also {found[number]}); keep one copy")
        found[number] = path
    return found


def _pair(images: dict[int, Path], labels: dict[int, Path], label_name: str, image_name: str) -> None:
    for number, image in images.items():
        if number not in labels:
            raise AqcfError(f"{image}: no label file {label_name.format(number)} found for this image")
    for number, label in labels.items():
        if number not in images:
            raise AqcfError(f"{label}: no image file {image_name.format(number)} found for this label")


def read_lits(root: str | Path, modality: str = CT) -> list[Case]:
    """Read a LiTS 2017 training cohort.

    Args:
        root: Folder holding ``volume-N.nii[.gz]`` and ``segmentation-N.nii[.gz]`` at any depth
            (flat, or inside ``Training_Batch1/`` and ``Training_Batch2/``).
        modality: Modality recorded in the cases (LiTS is CT).

    Returns:
        Cases ``lits-N`` sorted by N.

    Raises:
        AqcfError: The folder is missing or holds no case, a volume has no segmentation (or the
            reverse), or one case number appears twice.
    """
    modality = check_name(modality)
    folder = _check_folder(root)
    files = list(_visible_files(folder))
    volumes = _index_by_number(files, _LITS_VOLUME)
    labels = _index_by_number(files, _LITS_LABEL)
    if not volumes and not labels:
        test_only = any(p.name.startswith("test-volume-") for p in files)
        hint = " (only unlabeled test-volume-N files are there)" if test_only else ""
        raise AqcfError(
            f"{folder}: no LiTS case found{hint}; looked for volume-N.nii[.gz] with "
            "segmentation-N.nii[.gz] in it and its subfolders"
        )
    _pair(volumes, labels, "segmentation-{}.nii[.gz]", "volume-{}.nii[.gz]")
    return [Case(f"lits-{n}", modality, volumes[n], labels[n]) for n in sorted(volumes)]


def _find_images_folder(folder: Path, pattern: re.Pattern, what: str, looked: str) -> Path:
    candidates = sorted(
        p
        for p in [folder, *folder.rglob("imagesTr")]
        if p.name == "imagesTr" and p.is_dir() and any(pattern.match(f.name) for f in p.iterdir())
    )
    if not candidates:
        raise AqcfError(f"{folder}: no {what} found; looked for {looked} in it and its subfolders")
    if len(candidates) > 1:
        listing = ", ".join(str(c) for c in candidates)
        raise AqcfError(f"{folder}: several imagesTr/ folders found ({listing}); point at one of them")
    return candidates[0]


def _labels_folder(images_dir: Path) -> Path:
    labels_dir = images_dir.parent / "labelsTr"
    if not labels_dir.is_dir():
        raise AqcfError(f"{images_dir}: no labelsTr/ folder beside it")
    return labels_dir


def read_atlas(root: str | Path, modality: str = MRI) -> list[Case]:
    """Read the ATLAS training cohort.

    Args:
        root: Folder that contains, at any depth, ``imagesTr/imN.nii.gz`` with ``labelsTr/lbN.nii.gz``
            beside it (``.nii`` is accepted too).
        modality: Modality recorded in the cases (ATLAS is contrast-enhanced T1 MRI).

    Returns:
        Cases ``atlas-N`` sorted by N; ``imN`` is paired with ``lbN``.

    Raises:
        AqcfError: No or several ``imagesTr`` folders, no ``labelsTr`` beside it, an image without
            its label (or the reverse), or one case number twice.
    """
    modality = check_name(modality)
    folder = _check_folder(root)
    images_dir = _find_images_folder(
        folder, _ATLAS_IMAGE, "ATLAS case", "imagesTr/imN.nii.gz with labelsTr/lbN.nii.gz"
    )
    labels_dir = _labels_folder(images_dir)
    images = _index_by_number(_visible_files(images_dir), _ATLAS_IMAGE)
    labels = _index_by_number(_visible_files(labels_dir), _ATLAS_LABEL)
    _pair(images, labels, "labelsTr/lb{}.nii.gz", "imagesTr/im{}.nii.gz")
    return [Case(f"atlas-{n}", modality, images[n], labels[n]) for n in sorted(images)]


def _file_ending(dataset_dir: Path) -> str:
    dataset_json = dataset_dir / "dataset.json"
    if not dataset_json.is_file():
        return ".nii.gz"
    try:
        meta = json.loads(dataset_json.read_text())
    except (OSError, ValueError) as err:
        raise AqcfError(f"{dataset_json}: not a readable JSON file ({err})") from err
    channels = meta.get("channel_names", meta.get("modality", {"0": ""}))
    if isinstance(channels, dict) and len(channels) > 1:
        raise AqcfError(f"{dataset_json}: {len(channels)} input channels; aqcf reads single-channel cohorts")
    return str(meta.get("file_ending", ".nii.gz"))


def _strip(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) else None


def read_nnunet(root: str | Path, modality: str) -> list[Case]:
    """Read a cohort in the nnU-Net v2 raw or Medical Segmentation Decathlon layout.

    Args:
        root: The data set folder (``DatasetXXX_Name/`` or ``TaskXX_Name/``) or a folder above it;
            ``imagesTr`` is searched recursively.
        modality: ``"ct"`` or ``"mri"``.

    Returns:
        One case per label file ``labelsTr/CASE<ending>``, paired with ``imagesTr/CASE_0000<ending>``
        (nnU-Net) or ``imagesTr/CASE<ending>`` (MSD), sorted naturally by ``CASE``.

    Raises:
        AqcfError: No ``imagesTr``, a multi-channel data set, an image without its label (or the
            reverse).
    """
    modality = check_name(modality)
    folder = _check_folder(root)
    candidates = sorted(p for p in [folder, *folder.rglob("imagesTr")] if p.name == "imagesTr" and p.is_dir())
    if not candidates:
        raise AqcfError(
            f"{folder}: no nnU-Net/MSD cohort found; looked for imagesTr/CASE_0000.nii.gz or "
            "imagesTr/CASE.nii.gz with labelsTr/CASE.nii.gz"
        )
    if len(candidates) > 1:
        listing = ", ".join(str(c) for c in candidates)
        raise AqcfError(f"{folder}: several imagesTr/ folders found ({listing}); point at one of them")
    images_dir = candidates[0]
    labels_dir = _labels_folder(images_dir)
    ending = _file_ending(images_dir.parent)

    labels = {}
    for path in _visible_files(labels_dir):
        stem = _strip(path.name, ending)
        if stem is not None:
            labels[stem] = path
    images: dict[str, Path] = {}
    for path in _visible_files(images_dir):
        stem = _strip(path.name, ending)
        if stem is None:
            continue
        case_id, channel = stem, None
        match = _NNUNET_CHANNEL.match(stem)
        # A name like "X_0000" is MSD-style when a label "X_0000" exists, nnU-Net-style otherwise.
        if stem not in labels and match is not None:
            case_id, channel = match.group(1), match.group(2)
        if channel not in (None, "0000"):
            raise AqcfError(f"{path}: channel {channel}; aqcf reads single-channel cohorts (only _0000)")
        if case_id in images:
            raise AqcfError(f"{path}: case {case_id} appears twice (also {images[case_id]})")
        images[case_id] = path
    if not images and not labels:
        raise AqcfError(f"{images_dir}: no image ending in {ending} found")
    for case_id, path in images.items():
        if case_id not in labels:
            raise AqcfError(f"{path}: no label file labelsTr/{case_id}{ending} found for this image")
    for case_id, path in labels.items():
        if case_id not in images:
            raise AqcfError(
                f"{path}: no image file imagesTr/{case_id}_0000{ending} or imagesTr/{case_id}{ending} "
                "found for this label"
            )
    return [Case(i, modality, images[i], labels[i]) for i in sorted(images, key=natural_key)]


READERS: dict[str, Callable[..., list[Case]]] = {
    "lits": read_lits,
    "atlas": read_atlas,
    "nnunet": read_nnunet,
}
"""Cohort format name -> reader ``reader(root, modality) -> list[Case]``."""

# Readers of further formats (3D-IRCADb, LiverHccSeg) live there and register themselves on import.
_EXTERNAL_READERS_MODULE = "aqcf.data.external"


def register_reader(name: str, reader: Callable[..., list[Case]]) -> None:
    """Make ``reader(root, modality)`` available to :func:`read_cohort` as format ``name``."""
    READERS[name.lower()] = reader


def read_cohort(
    root: str | Path, format: str, modality: str, modalities: Sequence[str] | None = None
) -> list[Case]:
    """Read a cohort in one of the formats of :data:`READERS`.

    Args:
        root: The data set folder.
        format: ``"lits"``, ``"atlas"``, ``"nnunet"``, or a format registered with
            :func:`register_reader` (the external-cohort readers register on import).
        modality: The cohort's name, one of ``modalities``.
        modalities: The names allowed; ``None``: any stream name (``"ct"``, ``"mri"``, ``"t2"``, ...).
            The data module passes its cohorts' names.

    Returns:
        The cases, in the reader's order.
    """
    modality = check_name(modality) if modalities is None else check_modality(modality, modalities)
    name = str(format).lower()
    if name not in READERS:
        try:
            importlib.import_module(_EXTERNAL_READERS_MODULE)
        except ModuleNotFoundError as err:
            if err.name != _EXTERNAL_READERS_MODULE:
                raise
    if name not in READERS:
        raise AqcfError(f"cohort format {format!r} unknown; choose one of {', '.join(sorted(READERS))}")
    return READERS[name](root, modality=modality)


def read_geometry(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Read an image's voxel grid from its header, without the voxel data (:func:`aqcf.data.gate.read_header`).

    Args:
        path: A NIfTI file (read with nibabel), or another image file SimpleITK reads.

    Returns:
        ``(shape, affine)``: the spatial shape (X, Y, Z) (a singleton fourth axis removed) and the
        4×4 voxel-to-world (RAS, mm) matrix.

    Raises:
        AqcfError: The file is missing or unreadable, a ``.nii`` shorter than its header says, not
            one 3D volume, or a degenerate affine.
    """
    return gate.read_header(path)


def read_label_array(path: str | Path) -> np.ndarray:
    """Read a label map's voxels (any integer or float dtype) as stored, the file read to its end.

    Raises:
        AqcfError: The file cannot be read completely (missing, not an image, truncated) or is not
            one 3D volume.
    """
    return gate.load_volume(path, finite=False).array


def validate_case(case: Case, check_values: bool = True, tolerance_mm: float = SAME_GRID_TOLERANCE_MM) -> None:
    """Check one case before it is used (:func:`aqcf.data.gate.check_case`).

    Headers: readable, one 3D volume, a valid affine, the label on the image's grid. With
    ``check_values`` also the voxels: both files complete, the image's voxels finite, label values in
    {0, 1, 2}.

    Args:
        case: The case.
        check_values: Also read the voxels (the only checks that need more than the headers).
        tolerance_mm: Largest accepted difference between the image's and the label's affine (mm).

    Raises:
        AqcfError: One line naming the offending file.
    """
    gate.check_case(case, read_data=check_values, tolerance_mm=tolerance_mm)
