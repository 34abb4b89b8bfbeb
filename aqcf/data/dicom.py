"""DICOM series: reading the files, choosing one series of a folder, stacking its slices into a volume.

Every DICOM input goes through here: the 3D-IRCADb-01 reader (:mod:`aqcf.data.external`) and ``aqcf
segment``'s DICOM series folders (:mod:`aqcf.inference.segment`).

* :func:`dicom_series_to_volume` stacks single-frame slices: ordered by ImagePositionPatient projected
  on the slice normal (InstanceNumber if positions are missing), never by file name; RescaleSlope /
  Intercept applied, so CT is in HU; the affine from ImagePositionPatient, ImageOrientationPatient,
  PixelSpacing and the slice step, converted from DICOM's LPS to NIfTI's RAS. The slices pass the input
  gate first (:func:`aqcf.data.gate.check_dicom_slices`: monochrome single-frame slices of one size,
  pixel spacing and orientation, evenly spaced), and so does the stacked volume.
* A folder may hold several series (SeriesInstanceUID): :func:`list_series` lists them (UID,
  description, number of slices) and :func:`choose_series` picks one by its UID; slices of two series
  are never stacked together. A series that is not an image (a DICOM SEG, SR or RT structure set, or
  files without pixel data) is refused. :func:`read_dicom_series` reads the chosen one.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aqcf.data import gate
from aqcf.errors import AqcfError

__all__ = [
    "NON_IMAGE_MODALITIES",
    "POSITION_TOLERANCE_MM",
    "SPACING_RELATIVE_TOLERANCE",
    "LPS_TO_RAS",
    "Series",
    "read_dataset",
    "dicom_files",
    "is_dicom_folder",
    "list_series",
    "choose_series",
    "slice_positions",
    "same_slice_tolerance",
    "dicom_series_to_volume",
    "read_series_slices",
    "read_dicom_series",
]

#: DICOM Modality values of objects that carry no scan: segmentations, reports, structure sets, states
NON_IMAGE_MODALITIES = ("SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "REG", "DOC")
#: slice positions closer than this (mm) count as the same slice; the slice step may vary by this much
POSITION_TOLERANCE_MM = 1e-2
#: ...plus this fraction of the mean step
SPACING_RELATIVE_TOLERANCE = 1e-2
#: DICOM patient coordinates are LPS, NIfTI's are RAS
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# InstanceNumbers are integers: two closer than this are the same slice
_INSTANCE_TOLERANCE = 0.5
_INT16 = np.iinfo(np.int16)


# --------------------------------------------------------------------------------------------- files
def read_dataset(source: str | Path | bytes, name: str | None = None, *, force: bool = False,
                 header_only: bool = False):
    """One DICOM file as a pydicom dataset.

    Args:
        source: the file, or its bytes (a zip member).
        name: how the message names it (default: the path).
        force: read files without the Part 10 preamble (3D-IRCADb-01's slices).
        header_only: stop before the pixel data.

    Raises:
        AqcfError: ``"<name>: cannot read as DICOM (...)"``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        return pydicom.dcmread(handle, force=force, stop_before_pixels=header_only)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise AqcfError(f"{name or source}: cannot read as DICOM ({err})") from err


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (Part 10 files: a ``DICM`` marker after the preamble)."""
    from pydicom.misc import is_dicom

    folder = Path(folder)
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".") and is_dicom(p)]


def is_dicom_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds at least one DICOM file directly."""
    folder = Path(folder)
    return folder.is_dir() and bool(dicom_files(folder))


# -------------------------------------------------------------------------------------------- series
@dataclass(frozen=True)
class Series:
    """One series of a DICOM folder: ``uid`` (SeriesInstanceUID, ``""`` if absent), ``description``,
    ``modality`` (the DICOM Modality), ``slices`` (files with pixel data) and ``files`` (all of its files)."""

    uid: str
    description: str
    modality: str
    slices: int
    files: tuple[Path, ...]

    def summary(self) -> str:
        """``UID ('description', modality, N slices)`` for a listing."""
        uid = self.uid or "(no SeriesInstanceUID)"
        return f"{uid} ({self.description!r}, {self.modality or '?'}, {self.slices} slices)"


def list_series(folder: str | Path) -> list[Series]:
    """The series of a DICOM folder, in the order of their first file name (headers only are read).

    A file counts as a slice when its header describes an image (Rows and Columns).
    """
    grouped: dict[str, list] = {}
    for path in dicom_files(folder):
        dataset = read_dataset(path, header_only=True)
        grouped.setdefault(str(getattr(dataset, "SeriesInstanceUID", "")), []).append((path, dataset))
    series = []
    for uid, members in grouped.items():
        first = members[0][1]
        series.append(
            Series(
                uid=uid,
                description=str(getattr(first, "SeriesDescription", "")),
                modality=str(getattr(first, "Modality", "")),
                slices=sum("Rows" in ds and "Columns" in ds for _, ds in members),
                files=tuple(path for path, _ in members),
            )
        )
    return series


def choose_series(folder: str | Path, uid: str | None = None) -> Series:
    """The series of ``folder`` to read: the only one, or the one whose SeriesInstanceUID is ``uid``.

    Raises:
        AqcfError: one line: several series and no ``uid`` (they are listed), a ``uid`` the folder
            lacks (its series are listed), no DICOM file, or a series that is not an image.
    """
    folder = Path(folder)
    found = list_series(folder)
    if not found:
        raise AqcfError(f"{folder}: no DICOM files")
    listing = "; ".join(s.summary() for s in found)
    if uid is None:
        if len(found) > 1:
            raise AqcfError(f"{folder}: holds {len(found)} DICOM series, choose one with --series UID: {listing}")
        chosen = found[0]
    else:
        matching = [s for s in found if s.uid == uid]
        if not matching:
            raise AqcfError(f"{folder}: no series with SeriesInstanceUID {uid}; it holds: {listing}")
        chosen = matching[0]
    if chosen.modality.upper() in NON_IMAGE_MODALITIES or chosen.slices == 0:
        raise AqcfError(
            f"{folder}: series {chosen.summary()} is not an image series (Modality {chosen.modality or 'unset'}"
            f"{', no pixel data' if chosen.slices == 0 else ''}); give a CT or MR series"
        )
    return chosen


# -------------------------------------------------------------------------------------------- stacking
def _slice_normal(datasets: Sequence) -> np.ndarray | None:
    """The slice normal of a series whose slices share one orientation (:func:`gate.check_dicom_slices`)."""
    orientations = [getattr(ds, "ImageOrientationPatient", None) for ds in datasets]
    if any(o is None for o in orientations):
        return None
    first = np.asarray(orientations[0], dtype=float)
    return np.cross(first[:3], first[3:])


def slice_positions(datasets: Sequence, name: str) -> tuple[np.ndarray, str]:
    """One scalar per slice that orders the series, and its kind.

    Returns:
        ``(keys, kind)``: ``"position"``: ImagePositionPatient along the slice normal (mm), or
        ``"instance"``: InstanceNumber, where positions or orientations are missing.

    Raises:
        AqcfError: the slices have neither.
    """
    normal = _slice_normal(datasets)
    positions = [getattr(ds, "ImagePositionPatient", None) for ds in datasets]
    if normal is not None and all(p is not None for p in positions):
        return np.array([float(np.dot(normal, np.asarray(p, dtype=float))) for p in positions]), "position"
    if all(getattr(ds, "InstanceNumber", None) is not None for ds in datasets):
        return np.array([float(ds.InstanceNumber) for ds in datasets]), "instance"
    raise AqcfError(f"{name}: slices have neither ImagePositionPatient nor InstanceNumber to order them")


def same_slice_tolerance(kind: str) -> float:
    """How close two keys of :func:`slice_positions` of ``kind`` are when they name one slice."""
    return POSITION_TOLERANCE_MM if kind == "position" else _INSTANCE_TOLERANCE


def _ordered(datasets: Sequence, name: str) -> tuple[list, np.ndarray, str]:
    """The slices in volume order with their keys and kind (:func:`slice_positions`).

    Raises:
        AqcfError: two slices share one position.
    """
    keys, kind = slice_positions(datasets, name)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    if np.any(np.diff(keys) < same_slice_tolerance(kind)):
        raise AqcfError(f"{name}: two slices share one position")
    return [datasets[i] for i in order], keys, kind


def _stack_pixels(datasets: Sequence, name: str, rescale: bool) -> np.ndarray:
    """The slices' pixels as one (columns, rows, slices) volume, rescaled to HU when ``rescale``."""
    from pydicom.pixels import apply_rescale

    slices = []
    for ds in datasets:
        try:
            pixels = ds.pixel_array
        except Exception as err:  # pydicom raises many types for missing or undecodable pixel data
            raise AqcfError(f"{gate.dicom_slice_name(ds, name)}: cannot decode pixel data ({err})") from err
        # pixel_array is (rows, columns); NIfTI's first axis runs along a row (the column index)
        slices.append((apply_rescale(pixels, ds) if rescale else pixels).T)
    return np.stack(slices, axis=-1)


def _volume_affine(datasets: Sequence, keys: np.ndarray, kind: str, name: str) -> np.ndarray:
    """The 4×4 voxel-to-RAS affine (mm) of slices in volume order; the step between slices is checked
    to be even where it comes from their positions."""
    first = datasets[0]
    row_spacing, column_spacing = (float(v) for v in getattr(first, "PixelSpacing", (1.0, 1.0)))
    orientation = np.asarray(getattr(first, "ImageOrientationPatient", (1, 0, 0, 0, 1, 0)), dtype=float)
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    origin = np.asarray(getattr(first, "ImagePositionPatient", (0.0, 0.0, 0.0)), dtype=float)
    if kind == "position" and len(datasets) > 1:
        gate.check_slice_spacing(keys, name, POSITION_TOLERANCE_MM, SPACING_RELATIVE_TOLERANCE)
        last = np.asarray(datasets[-1].ImagePositionPatient, dtype=float)
        step = (last - origin) / (len(datasets) - 1)
    else:
        thickness = getattr(first, "SpacingBetweenSlices", None) or getattr(first, "SliceThickness", None)
        step = np.cross(row_cosine, column_cosine) * float(thickness or 1.0)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * column_spacing
    affine_lps[:3, 1] = column_cosine * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = origin
    return LPS_TO_RAS @ affine_lps


def dicom_series_to_volume(
    datasets: Sequence, name: str = "DICOM series", rescale: bool = True
) -> tuple[np.ndarray, np.ndarray, list]:
    """Stack single-frame DICOM slices into a volume in NIfTI (RAS) world coordinates.

    Args:
        datasets: the slices (pydicom datasets), in any order.
        name: how error messages name the series (its folder).
        rescale: apply RescaleSlope / RescaleIntercept (CT: stored values -> HU).

    Returns:
        ``(volume, affine, ordered)``: volume (columns, rows, slices) = (X, Y, Z), HU when rescaled,
        slices ordered by position along the slice normal (by InstanceNumber if positions are
        missing); the 4×4 voxel-to-RAS affine in mm; the datasets in volume order.

    Raises:
        AqcfError: The slices fail the input gate (:func:`aqcf.data.gate.check_dicom_slices`: not
            monochrome single-frame, or differing size, pixel spacing or orientation), share a
            position, are unevenly spaced, or stack to a volume the gate refuses (one slice, a
            degenerate affine, non-finite values).
    """
    if not datasets:
        raise AqcfError(f"{name}: no DICOM slices")
    gate.check_dicom_slices(datasets, name)
    datasets, keys, kind = _ordered(datasets, name)
    volume = _stack_pixels(datasets, name, rescale)
    affine = _volume_affine(datasets, keys, kind, name)
    gate.check_array(name, volume, affine)
    return volume, affine, datasets


# ------------------------------------------------------------------------------------------- a folder
def read_series_slices(folder: str | Path, uid: str | None = None) -> tuple[np.ndarray, np.ndarray, list]:
    """Read one image series of a folder: :func:`read_dicom_series` plus the slices in volume order.

    Returns:
        ``(volume, affine, datasets)``: the datasets (pydicom, with pixel data) ordered as the volume's
        last axis.
    """
    folder = Path(folder)
    chosen = choose_series(folder, uid)
    datasets = [ds for ds in (read_dataset(path) for path in chosen.files) if "PixelData" in ds]
    if not datasets:
        raise AqcfError(f"{folder}: no DICOM image slices")
    volume, affine, ordered = dicom_series_to_volume(datasets, name=str(folder), rescale=True)
    integral = np.all(np.mod(volume, 1) == 0) and volume.min() >= _INT16.min and volume.max() <= _INT16.max
    return volume.astype(np.int16 if integral else np.float32), affine, ordered


def read_dicom_series(folder: str | Path, uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read the one image series of a folder into a volume.

    Args:
        folder: a folder holding the slices of one series (files without pixel data, such as a
            DICOMDIR, are ignored), or of several series of which ``uid`` names one.
        uid: the SeriesInstanceUID to read (:func:`choose_series`); needed when the folder holds several.

    Returns:
        ``(volume, affine)``: (X, Y, Z) = (columns, rows, slices) int16 where the rescaled values are
        integers that fit (CT in HU), float32 otherwise; the 4×4 voxel-to-RAS affine in mm.

    Raises:
        AqcfError: no readable slice, several series and no ``uid``, a series that is not an image,
            or slices the input gate refuses
            (:mod:`aqcf.data.gate`): not monochrome single-frame images (an RGB secondary capture),
            differing size, pixel spacing or orientation, uneven slice spacing, a single slice, a
            degenerate geometry.
    """
    volume, affine, _ = read_series_slices(folder, uid)
    return volume, affine
