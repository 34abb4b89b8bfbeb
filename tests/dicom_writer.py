"""Writes single DICOM CT slices for the tests of the DICOM readers (IRCADb, `aqcf segment` input)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_ct_slice(
    path: Path,
    pixels: np.ndarray,
    *,
    spacing: Sequence[float],
    position: Sequence[float] | None = None,
    instance: int | None = None,
    thickness: float | None = None,
    bits: int = 16,
    intercept: float | None = None,
    series_uid: str | None = None,
) -> None:
    """One unsigned CT slice (rows, columns); orientation is axial when ``position`` is given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = list(spacing)
    if thickness is not None:
        ds.SliceThickness = thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if intercept is not None:
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
    ds.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
