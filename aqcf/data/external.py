"""Readers of the external test cohorts: 3D-IRCADb-01 (CT, DICOM) and LiverHccSeg (multiphasic MRI).

Both return :class:`aqcf.data.cohorts.Case` objects whose ``image`` and ``label`` are NIfTI files, so
the rest of the pipeline (``aqcf segment``, ``aqcf evaluate --ref-format ircadb|liverhccseg``) treats
them like any other cohort. Conversions run once per case into a cache folder (atomically, with a
``.json`` record of the sources; a changed source or setting converts again).

3D-IRCADb-01 (:func:`read_ircadb`): the ``liver`` mask gives label 1 and the liver-tumor folders, those
matching :data:`IRCADB_LIVER_TUMOR_PATTERN`, give label 2 (overriding 1). Image and mask series are
stacked by :mod:`aqcf.data.dicom`, which documents slice order, geometry and the input gate's checks.
Layout, and which structure folders are and are not liver tumor: docs/evaluation.md, *3D-IRCADb-01*.

LiverHccSeg: the release's file layout is not confirmed; :func:`read_liverhccseg` takes the phase, the
rater and the file-name patterns as arguments (defaults in ``docs/evaluation.md``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from aqcf.constants import CT, LIVER, MRI, TUMOR, check_modality
from aqcf.data import gate
from aqcf.data.cohorts import Case, natural_key, register_reader
from aqcf.data.dicom import dicom_series_to_volume, read_dataset, same_slice_tolerance, slice_positions
from aqcf.data.gate import SAME_GRID_TOLERANCE_MM
from aqcf.errors import AqcfError
from aqcf.io import atomic_path, is_nifti_name, nifti_image, save_nifti_atomic, write_json_atomic

__all__ = [
    "IRCADB_LIVER_FOLDER",
    "IRCADB_LIVER_TUMOR_PATTERN",
    "default_cache_dir",
    "find_ircadb_patients",
    "is_ircadb_liver_tumor",
    "convert_ircadb_patient",
    "read_ircadb",
    "read_liverhccseg",
]

IRCADB_PATIENT_PATTERN = re.compile(r"^3Dircadb1\.(\d+)$", re.IGNORECASE)
IRCADB_LIVER_FOLDER = "liver"
IRCADB_LIVER_TUMOR_PATTERN = r"^livertumor(s|\d+)?$"
IMAGES, LABELS = "imagesTs", "labelsTs"
# bump when the conversion's output would change for the same sources
CONVERTER_VERSION = 1
SEARCH_DEPTH = 3
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# words that mark a LiverHccSeg file as a mask, never an image
MASK_WORDS = ("liver", "tumo", "seg", "mask", "label")


def default_cache_dir() -> Path:
    """``$AQCF_CACHE`` or ``~/.cache/aqcf``: where converted external cohorts go unless told otherwise."""
    return Path(os.environ.get("AQCF_CACHE", Path.home() / ".cache" / "aqcf")).expanduser()


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def _find_folders(root: Path, is_target: Callable[[Path], object], max_depth: int = SEARCH_DEPTH) -> list[Path]:
    """The folders ``is_target`` accepts, ``root`` and up to ``max_depth`` levels below it, breadth
    first; an accepted folder is not searched further."""
    found, frontier = [], [root]
    for _ in range(max_depth + 1):
        next_frontier = []
        for folder in frontier:
            if is_target(folder):
                found.append(folder)
                continue
            next_frontier += _subfolders(folder)
        frontier = next_frontier
    return found


def _merge_masks(shape: tuple, masks: Iterable[tuple[int, np.ndarray]]) -> np.ndarray:
    """A uint8 label map of ``shape`` from ``(value, boolean mask)`` pairs painted in turn, so a later
    value overrides an earlier one (tumor after liver: 2 overrides 1)."""
    label = np.zeros(shape, dtype=np.uint8)
    for value, mask in masks:
        label[mask] = value
    return label


def _file_signature(paths: Sequence[Path], root: Path) -> str:
    """Hash of the names, sizes and modification times of ``paths``: changes when a source changes."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_is_current(record: Path, outputs: Sequence[Path], signature: dict) -> bool:
    if not record.is_file() or not all(p.is_file() for p in outputs):
        return False
    try:
        return json.loads(record.read_text()).get("signature") == signature
    except (json.JSONDecodeError, OSError):
        return False


# ------------------------------------------------------------------------------------- 3D-IRCADb-01


def is_ircadb_liver_tumor(structure: str, pattern: str = IRCADB_LIVER_TUMOR_PATTERN) -> bool:
    """Whether a ``MASKS_DICOM`` folder name is a liver tumor (``livertumor03`` yes, ``tumor`` no)."""
    return re.match(pattern, structure, re.IGNORECASE) is not None


def find_ircadb_patients(root: str | Path, max_depth: int = SEARCH_DEPTH) -> list[Path]:
    """The ``3Dircadb1.N`` folders below ``root`` (``root`` itself included), sorted by N."""
    root = Path(root)
    if not root.is_dir():
        raise AqcfError(f"{root}: 3D-IRCADb-01 folder not found")
    found = _find_folders(root, lambda folder: IRCADB_PATIENT_PATTERN.match(folder.name), max_depth)
    numbers = {}
    for folder in found:
        number = int(IRCADB_PATIENT_PATTERN.match(folder.name).group(1))
        if number in numbers:
            raise AqcfError(f"{root}: patient {folder.name} found twice ({numbers[number]} and {folder})")
        numbers[number] = folder
    return [numbers[n] for n in sorted(numbers)]


class _PatientSources:
    """The DICOM files of one IRCADb patient, from unpacked folders or the distributed zips."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.image_dir = folder / "PATIENT_DICOM"
        self.mask_dir = folder / "MASKS_DICOM"
        self.image_zip = folder / "PATIENT_DICOM.zip"
        self.mask_zip = folder / "MASKS_DICOM.zip"
        if not (self.image_dir.is_dir() or self.image_zip.is_file()):
            raise AqcfError(f"{folder}: neither PATIENT_DICOM/ nor PATIENT_DICOM.zip")
        if not (self.mask_dir.is_dir() or self.mask_zip.is_file()):
            raise AqcfError(f"{folder}: neither MASKS_DICOM/ nor MASKS_DICOM.zip")

    @staticmethod
    def _dir_files(folder: Path) -> list[Path]:
        return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]

    @staticmethod
    def _zip_members(archive: Path, top: str) -> dict[str, list[str]]:
        """Subfolder below ``top`` ('' for files directly in it) -> member names, from a zip."""
        groups: dict[str, list[str]] = {}
        with zipfile.ZipFile(archive) as handle:
            for member in handle.namelist():
                parts = [p for p in member.split("/") if p]
                if member.endswith("/") or top not in parts or parts[-1].startswith("."):
                    continue
                rest = parts[parts.index(top) + 1:]
                if len(rest) == 1:
                    groups.setdefault("", []).append(member)
                elif len(rest) == 2:
                    groups.setdefault(rest[0], []).append(member)
        return groups

    def source_files(self) -> list[Path]:
        """Files whose change must trigger a new conversion."""
        if self.image_dir.is_dir():
            files = self._dir_files(self.image_dir)
        else:
            files = [self.image_zip]
        if self.mask_dir.is_dir():
            for structure in self.structures():
                files += self._dir_files(self.mask_dir / structure)
        else:
            files.append(self.mask_zip)
        return files

    def structures(self) -> list[str]:
        if self.mask_dir.is_dir():
            return [p.name for p in _subfolders(self.mask_dir)]
        return sorted(k for k in self._zip_members(self.mask_zip, "MASKS_DICOM") if k)

    def _read(self, folder: Path, archive: Path, top: str, group: str) -> list:
        if folder.is_dir():
            target = folder / group if group else folder
            return [read_dataset(p, str(p), force=True) for p in self._dir_files(target)]
        members = self._zip_members(archive, top).get(group, [])
        with zipfile.ZipFile(archive) as handle:
            return [read_dataset(handle.read(m), f"{archive}:{m}", force=True) for m in sorted(members)]

    def image_slices(self) -> list:
        return self._read(self.image_dir, self.image_zip, "PATIENT_DICOM", "")

    def mask_slices(self, structure: str) -> list:
        return self._read(self.mask_dir, self.mask_zip, "MASKS_DICOM", structure)


def _mask_volume(datasets: Sequence, image_slices: Sequence, shape: tuple, name: str) -> np.ndarray:
    """Place each slice of one mask series at the image slice with its position, shape (X, Y, Z).

    Masks are matched by position along the slice normal; by InstanceNumber where a mask series has
    no positions.
    """
    gate.check_dicom_slices(datasets, name)
    keys, kind = slice_positions(datasets, name)
    image_keys, image_kind = slice_positions(image_slices, name)
    if kind != image_kind:
        if kind != "instance" or any(getattr(ds, "InstanceNumber", None) is None for ds in image_slices):
            raise AqcfError(f"{name}: mask slices ordered by {kind} but the image slices cannot be")
        image_keys = np.array([float(ds.InstanceNumber) for ds in image_slices])
    tolerance = same_slice_tolerance(kind)
    volume = np.zeros(shape, dtype=bool)
    for key, ds in zip(keys, datasets, strict=True):
        index = int(np.argmin(np.abs(image_keys - key)))
        if abs(image_keys[index] - key) > tolerance:
            raise AqcfError(f"{name}: a mask slice at {key:.3f} matches no image slice")
        pixels = ds.pixel_array
        if pixels.T.shape != shape[:2]:
            raise AqcfError(f"{name}: mask slices are {pixels.shape}, image slices {shape[1::-1]}")
        volume[:, :, index] |= pixels.T != 0
    return volume


def convert_ircadb_patient(
    folder: str | Path, cache_dir: str | Path, tumor_pattern: str = IRCADB_LIVER_TUMOR_PATTERN
) -> Case:
    """Convert one ``3Dircadb1.N`` patient to ``imagesTs/ID.nii.gz`` (HU) and ``labelsTs/ID.nii.gz``.

    Nothing is converted when the cache holds a conversion of the same sources and settings.

    Args:
        folder: the patient folder.
        cache_dir: output folder; receives ``imagesTs/``, ``labelsTs/`` and ``records/ID.json``.
        tumor_pattern: regular expression (case-insensitive) of the ``MASKS_DICOM`` folders merged into
            label 2.

    Returns:
        The case (id = folder name, modality ``"ct"``).
    """
    folder, cache_dir = Path(folder), Path(cache_dir)
    sources = _PatientSources(folder)
    case_key = folder.name
    image_path = cache_dir / IMAGES / f"{case_key}.nii.gz"
    label_path = cache_dir / LABELS / f"{case_key}.nii.gz"
    record = cache_dir / "records" / f"{case_key}.json"
    structures = sources.structures()
    tumors = [s for s in structures if is_ircadb_liver_tumor(s, tumor_pattern)]
    livers = [s for s in structures if s.lower() == IRCADB_LIVER_FOLDER]
    signature = {
        "converter": CONVERTER_VERSION,
        "tumor_pattern": tumor_pattern,
        "sources": _file_signature(sources.source_files(), folder),
    }
    case = Case(id=case_key, modality=CT, image=image_path, label=label_path)
    if _cache_is_current(record, (image_path, label_path), signature):
        return case
    if not livers:
        found = ", ".join(structures) or "none"
        raise AqcfError(f"{folder}: MASKS_DICOM has no 'liver' folder (found: {found})")

    image_slices = sources.image_slices()
    volume, affine, image_slices = dicom_series_to_volume(image_slices, f"{folder}/PATIENT_DICOM")
    slopes = {float(getattr(ds, "RescaleSlope", 1)) for ds in image_slices}
    intercepts = {float(getattr(ds, "RescaleIntercept", 0)) for ds in image_slices}
    integral = slopes == {1.0} and all(i.is_integer() for i in intercepts)
    volume = volume.astype(np.int16 if integral else np.float32)

    label = _merge_masks(volume.shape, (  # tumor comes after liver, so 2 overrides 1
        (value, _mask_volume(sources.mask_slices(s), image_slices, volume.shape, f"{folder}/MASKS_DICOM/{s}"))
        for s, value in [(s, LIVER) for s in livers] + [(s, TUMOR) for s in tumors]
    ))

    save_nifti_atomic(nifti_image(volume, affine), image_path)
    save_nifti_atomic(nifti_image(label, affine), label_path)
    write_json_atomic(record, {
        "signature": signature,
        "source": str(folder),
        "liver": livers,
        "liver_tumor": tumors,
        "ignored": [s for s in structures if s not in livers and s not in tumors],
        "slice_order": slice_positions(image_slices, str(folder))[1],
    })
    return case


def read_ircadb(
    root: str | Path,
    cache_dir: str | Path | None = None,
    *,
    modality: str = CT,
    tumor_pattern: str = IRCADB_LIVER_TUMOR_PATTERN,
    progress: bool = False,
) -> list[Case]:
    """The 3D-IRCADb-01 patients below ``root`` as NIfTI cases, converted on first use.

    Args:
        root: folder holding ``3Dircadb1.N`` folders (directly or up to three levels down).
        cache_dir: where the NIfTI files go; default ``default_cache_dir() / "ircadb"``.
        modality: must be ``"ct"`` (the argument exists for :func:`aqcf.data.cohorts.read_cohort`).
        tumor_pattern: regular expression of the mask folders that count as liver tumor.
        progress: show a progress bar over patients.

    Returns:
        One case per patient (id ``3Dircadb1.N``, modality ``"ct"``), sorted by N.
    """
    from tqdm import tqdm

    if check_modality(modality) != CT:
        raise AqcfError(f"{root}: 3D-IRCADb-01 is CT, not {modality!r}")
    patients = find_ircadb_patients(root)
    if not patients:
        raise AqcfError(f"{root}: no 3Dircadb1.N folders found")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "ircadb"
    return [
        convert_ircadb_patient(folder, cache, tumor_pattern)
        for folder in tqdm(patients, desc="3D-IRCADb-01", unit="patient", disable=not progress)
    ]


# ------------------------------------------------------------------------------------- LiverHccSeg


def _strip_suffix(name: str) -> str | None:
    lowered = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _match_one(
    files: Sequence[Path], pattern: str, folder: Path, what: str, exclude: Callable[[Path], bool]
) -> Path | None:
    """The file whose suffix-less name matches ``pattern``; None if none, an error if several."""
    hits = [
        p for p in files if not exclude(p) and fnmatch.fnmatch(_strip_suffix(p.name).lower(), pattern.lower())
    ]
    if len(hits) > 1:
        raise AqcfError(f"{folder}: {len(hits)} files match the {what} pattern {pattern!r}: "
                        f"{', '.join(p.name for p in hits)}")
    return hits[0] if hits else None


def _as_nifti(path: Path, cache: Path) -> Path:
    """``path`` itself if NIfTI, else a NIfTI copy in ``cache`` (converted with SimpleITK)."""
    if is_nifti_name(path):
        return path
    import SimpleITK as sitk

    target = cache / f"{_strip_suffix(path.name)}.nii.gz"
    if target.is_file() and target.stat().st_mtime_ns >= path.stat().st_mtime_ns:
        return target
    try:
        with atomic_path(target, suffix=".nii.gz") as tmp:
            sitk.WriteImage(sitk.ReadImage(str(path)), str(tmp))
    except RuntimeError as err:
        raise AqcfError(f"{path}: cannot read as an image ({err})") from err
    return target


def _is_mask(path: Path) -> bool:
    """Whether a LiverHccSeg file's name marks it as a mask (:data:`MASK_WORDS`), never an image."""
    stem = _strip_suffix(path.name).lower()
    return any(word in stem for word in MASK_WORDS)


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files (:data:`IMAGE_SUFFIXES`, not hidden) in ``folder``, or anywhere below it, sorted."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and not p.name.startswith(".") and _strip_suffix(p.name))


def _liverhccseg_case_folders(root: Path, image_glob: str) -> list[Path]:
    """The case folders: folders below ``root`` (not ``root`` itself) holding an image matching
    ``image_glob`` directly, in natural order of their names."""

    def is_case(folder: Path) -> bool:
        return folder != root and _match_one(_image_files(folder), image_glob, folder, "image", _is_mask) is not None

    return sorted(_find_folders(root, is_case), key=lambda p: natural_key(p.name))


def _mask_on_grid(path: Path, converted: Path, image: Path, shape: tuple, affine: np.ndarray) -> np.ndarray:
    """The boolean mask of ``path`` (any value > 0), which must lie on the image's voxel grid."""
    mask = gate.load_volume(_as_nifti(path, converted))
    same_grid = mask.array.shape == shape and np.allclose(mask.affine, affine, atol=SAME_GRID_TOLERANCE_MM)
    if not same_grid:
        raise AqcfError(f"{path}: voxel grid {mask.shape} differs from the image {image.name} {shape}")
    return mask.array > 0


def _liverhccseg_case(folder: Path, image: Path, masks: dict[int, Path | None], cache: Path) -> Case:
    """One case: its image as NIfTI and its masks merged into ``labelsTs/<case>.nii.gz`` (0/1/2, a
    missing mask leaves its class empty); nothing is merged when the cache holds the same sources."""
    converted = cache / "converted" / folder.name
    image_nifti = _as_nifti(image, converted)
    label_path = cache / LABELS / f"{folder.name}.nii.gz"
    record = cache / "records" / f"{folder.name}.json"
    sources = [image] + [p for p in masks.values() if p is not None]
    signature = {"converter": CONVERTER_VERSION, "sources": _file_signature(sources, folder),
                 "masks": {str(k): (p.name if p else None) for k, p in masks.items()}}
    if not _cache_is_current(record, (label_path,), signature):
        # the image's voxels are read (and checked) when it is segmented; the masks' here, once
        shape, affine = gate.read_header(image_nifti)
        label = _merge_masks(shape, (
            (value, _mask_on_grid(path, converted, image, shape, affine))
            for value, path in masks.items() if path is not None
        ))
        save_nifti_atomic(nifti_image(label, affine), label_path)
        write_json_atomic(record, {"signature": signature, "image": str(image)})
    return Case(id=folder.name, modality=MRI, image=image_nifti, label=label_path)


def _no_file(path: Path) -> bool:
    """Excludes nothing: any file may be a mask."""
    return False


def read_liverhccseg(
    root: str | Path,
    *,
    phase: str = "arterial",
    rater: str = "R1",
    image_pattern: str = "*{phase}*",
    liver_pattern: str = "*{rater}*liver*",
    tumor_pattern: str = "*{rater}*tumo*",
    missing_mask: str = "skip",
    cache_dir: str | Path | None = None,
    modality: str = MRI,
) -> list[Case]:
    """LiverHccSeg cases: one phase as the image, one rater's liver and tumor masks merged to 0/1/2.

    Expected layout (configurable through the patterns)::

        root/<case>/<...phase...>.nii.gz          one image per phase, e.g. arterial.nii.gz
        root/<case>/<...rater...liver...>.nii.gz  e.g. R1_liver.nii.gz (any value > 0 is liver)
        root/<case>/<...rater...tumor...>.nii.gz  e.g. R1_tumor.nii.gz (any value > 0 is tumor)

    Patterns are shell globs, matched case-insensitively against file names without their image
    suffix (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``), anywhere below the case
    folder, after ``{phase}`` and ``{rater}`` are filled in; mask files never count as images. A case
    folder is a folder (up to three levels below ``root``) holding a file that matches the image
    pattern directly. Masks must share the image's voxel grid.

    Args:
        root: dataset folder.
        phase: the phase used as input image.
        rater: whose masks are the reference.
        image_pattern, liver_pattern, tumor_pattern: file-name globs (see above).
        missing_mask: a case without the rater's liver or tumor mask (the release has 17 liver and 14
            tumor segmentations) is ``"skip"``-ped (with a warning), an ``"error"``, or evaluated with
            that class ``"empty"``.
        cache_dir: where merged labels (and NIfTI copies of non-NIfTI images) go; default
            ``default_cache_dir() / "liverhccseg"``.
        modality: must be ``"mri"`` (the argument exists for :func:`aqcf.data.cohorts.read_cohort`).

    Returns:
        Cases (id = case folder name, modality ``"mri"``) with image and merged label NIfTI files.
    """
    root = Path(root)
    if check_modality(modality) != MRI:
        raise AqcfError(f"{root}: LiverHccSeg is MRI, not {modality!r}")
    if not root.is_dir():
        raise AqcfError(f"{root}: LiverHccSeg folder not found")
    if missing_mask not in ("skip", "error", "empty"):
        raise AqcfError(f"missing_mask {missing_mask!r} is not one of 'skip', 'error', 'empty'")
    image_glob = image_pattern.format(phase=phase, rater=rater)
    liver_glob = liver_pattern.format(phase=phase, rater=rater)
    tumor_glob = tumor_pattern.format(phase=phase, rater=rater)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "liverhccseg"
    cache = base / f"{phase}_{rater}"

    case_folders = _liverhccseg_case_folders(root, image_glob)
    if not case_folders:
        raise AqcfError(f"{root}: no case folder holds an image matching {image_glob!r} (phase {phase!r})")
    cases, skipped = [], []
    for folder in case_folders:
        files = _image_files(folder, recursive=True)
        image = _match_one(files, image_glob, folder, "image", _is_mask)
        masks = {
            LIVER: _match_one(files, liver_glob, folder, "liver mask", _no_file),
            TUMOR: _match_one(files, tumor_glob, folder, "tumor mask", _no_file),
        }
        globs = {LIVER: ("liver", liver_glob), TUMOR: ("tumor", tumor_glob)}
        missing = [f"{what} ({glob!r})" for value, (what, glob) in globs.items() if masks[value] is None]
        if missing and missing_mask == "error":
            raise AqcfError(f"{folder}: no {' or '.join(missing)} mask of rater {rater!r}")
        if missing and missing_mask == "skip":
            skipped.append(folder.name)
            continue
        cases.append(_liverhccseg_case(folder, image, masks, cache))
    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} case(s) without both masks of rater {rater!r}: "
                      f"{', '.join(skipped)}", stacklevel=2)
    if not cases:
        raise AqcfError(f"{root}: no case has the liver and tumor masks of rater {rater!r}")
    return cases


register_reader("ircadb", read_ircadb)
register_reader("liverhccseg", read_liverhccseg)
