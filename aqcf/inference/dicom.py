"""A DICOM series folder as ``aqcf segment`` input.

The slices are stacked by :func:`aqcf.data.external.dicom_series_to_volume` (ordered by position along
the slice normal, RescaleSlope/Intercept applied, so CT is in HU; the affine converted from DICOM's LPS to
NIfTI's RAS) and the volume is saved as a NIfTI file, which then goes through the same path as a NIfTI
input. The mask is written on that volume's grid: (columns, rows, slices) with that affine. The slices
pass the input gate first (:func:`aqcf.data.gate.check_dicom_slices`): only monochrome single-frame
slices of one size, pixel spacing and orientation, evenly spaced, are stacked.

A folder may hold several series (SeriesInstanceUID): :func:`list_series` lists them (UID, description,
number of slices) and one is chosen by its UID; slices of two series are never stacked together. A
series that is not an image (a DICOM SEG, SR or RT structure set, or files without pixel data) is
refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from aqcf.data.external import dicom_series_to_volume
from aqcf.errors import AqcfError

__all__ = [
    "NON_IMAGE_MODALITIES",
    "Series",
    "dicom_files",
    "is_dicom_folder",
    "list_series",
    "choose_series",
    "read_dicom_series",
    "read_series_slices",
    "dicom_series_to_nifti",
]

_INT16 = np.iinfo(np.int16)
#: DICOM Modality values of objects that carry no scan: segmentations, reports, structure sets, states
NON_IMAGE_MODALITIES = ("SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "REG", "DOC")


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


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (Part 10 files: a ``DICM`` marker after the preamble)."""
    from pydicom.misc import is_dicom

    folder = Path(folder)
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".") and is_dicom(p)]


def is_dicom_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds at least one DICOM file directly."""
    folder = Path(folder)
    return folder.is_dir() and bool(dicom_files(folder))


def _read(path: Path, header_only: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise AqcfError(f"{path}: cannot read as DICOM ({err})") from err


def list_series(folder: str | Path) -> list[Series]:
    """The series of a DICOM folder, in the order of their first file name (headers only are read).

    A file counts as a slice when its header describes an image (Rows and Columns).
    """
    grouped: dict[str, list] = {}
    for path in dicom_files(folder):
        dataset = _read(path, header_only=True)
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
    """The series of ``folder`` to segment: the only one, or the one whose SeriesInstanceUID is ``uid``.

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


def read_series_slices(folder: str | Path, uid: str | None = None) -> tuple[np.ndarray, np.ndarray, list]:
    """Read one image series of a folder: :func:`read_dicom_series` plus the slices in volume order.

    Returns:
        ``(volume, affine, datasets)``: the datasets (pydicom, with pixel data) ordered as the volume's
        last axis.
    """
    folder = Path(folder)
    chosen = choose_series(folder, uid)
    datasets = [ds for ds in (_read(path) for path in chosen.files) if "PixelData" in ds]
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


def dicom_series_to_nifti(
    folder: str | Path, path: str | Path, uid: str | None = None, volume: tuple | None = None
) -> nib.Nifti1Image:
    """Convert a DICOM series folder to a NIfTI file (scanner coordinates, mm) and return the image.

    ``volume`` is a ``(volume, affine)`` pair already read (:func:`read_series_slices`), so a series that
    is also needed as slices is read once.
    """
    volume, affine = volume if volume is not None else read_dicom_series(folder, uid)
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, os.fspath(path))
    return nib.load(os.fspath(path))
