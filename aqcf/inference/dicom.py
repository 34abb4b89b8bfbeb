"""A DICOM series folder as ``aqcf segment`` input.

The slices are stacked by :func:`aqcf.data.external.dicom_series_to_volume` (ordered by position along
the slice normal, RescaleSlope/Intercept applied, so CT is in HU; the affine converted from DICOM's LPS to
NIfTI's RAS) and the volume is saved as a NIfTI file, which then goes through the same path as a NIfTI
input. The mask is written on that volume's grid: (columns, rows, slices) with that affine. The slices
pass the input gate first (:func:`aqcf.data.gate.check_dicom_slices`): only monochrome single-frame
slices of one size, pixel spacing and orientation, evenly spaced, are stacked.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from aqcf.data.external import dicom_series_to_volume
from aqcf.errors import AqcfError

__all__ = ["dicom_files", "is_dicom_folder", "read_dicom_series", "dicom_series_to_nifti"]

_INT16 = np.iinfo(np.int16)


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (Part 10 files: a ``DICM`` marker after the preamble)."""
    from pydicom.misc import is_dicom

    folder = Path(folder)
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".") and is_dicom(p)]


def is_dicom_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds at least one DICOM file directly."""
    folder = Path(folder)
    return folder.is_dir() and bool(dicom_files(folder))


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the one image series of a folder into a volume.

    Args:
        folder: a folder holding the slices of one series (files without pixel data, such as a
            DICOMDIR, are ignored).

    Returns:
        ``(volume, affine)``: (X, Y, Z) = (columns, rows, slices) int16 where the rescaled values are
        integers that fit (CT in HU), float32 otherwise; the 4×4 voxel-to-RAS affine in mm.

    Raises:
        AqcfError: no readable slice, several series, or slices the input gate refuses
            (:mod:`aqcf.data.gate`): not monochrome single-frame images (an RGB secondary capture),
            differing size, pixel spacing or orientation, uneven slice spacing, a single slice, a
            degenerate geometry.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    datasets = []
    for path in dicom_files(folder):
        try:
            dataset = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as err:
            raise AqcfError(f"{path}: cannot read as DICOM ({err})") from err
        if "PixelData" in dataset:
            datasets.append(dataset)
    if not datasets:
        raise AqcfError(f"{folder}: no DICOM image slices")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise AqcfError(f"{folder}: holds {len(series)} DICOM series; give each series its own folder")
    volume, affine, _ = dicom_series_to_volume(datasets, name=str(folder), rescale=True)
    integral = np.all(np.mod(volume, 1) == 0) and volume.min() >= _INT16.min and volume.max() <= _INT16.max
    return volume.astype(np.int16 if integral else np.float32), affine


def dicom_series_to_nifti(folder: str | Path, path: str | Path) -> nib.Nifti1Image:
    """Convert a DICOM series folder to a NIfTI file (scanner coordinates, mm) and return the image."""
    volume, affine = read_dicom_series(folder)
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, os.fspath(path))
    return nib.load(os.fspath(path))
