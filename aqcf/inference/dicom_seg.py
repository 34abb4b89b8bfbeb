"""A label map as a DICOM Segmentation object (``aqcf segment --dicom-seg``), written with highdicom.

The object is a BINARY Segmentation that references the source series' slices (SOP instance UIDs),
one frame per source slice and segment, in the source's geometry, with empty frames kept. Two
segments, overlapping as in the evaluation's convention: ``liver`` (labels 1 and 2) and ``tumor``
(label 2), coded in SNOMED CT from pydicom's ``codes.SCT``. The codes and why they were chosen:
docs/inference.md, *DICOM Segmentation output*.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aqcf.constants import REGIONS, region_mask
from aqcf.errors import AqcfError, first_line

__all__ = ["SEGMENTS", "require_highdicom", "segment_frames", "write_dicom_seg"]

#: (segment label, labels it covers, property category, property type) with SNOMED CT codes; the
#: segments are the evaluated regions (:data:`aqcf.constants.REGIONS`)
SEGMENTS = (
    ("liver", REGIONS["liver"], ("91723000", "Anatomical Structure"), ("10200004", "Liver")),
    ("tumor", REGIONS["tumor"], ("49755003", "Morphologically Abnormal Structure"), ("108369006", "Neoplasm")),
)
_HINT = "pip install 'aqcf[dicom]'"
# Type 2 patient and study attributes a Segmentation copies from its source: present in any scanner's
# files, possibly empty; an anonymised or converted series may lack them, and empty is what DICOM allows
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def require_highdicom() -> None:
    """:class:`AqcfError` unless highdicom is installed (checked before any work)."""
    if importlib.util.find_spec("highdicom") is None:
        raise AqcfError(f"--dicom-seg needs highdicom ({_HINT})")


def segment_frames(labels: np.ndarray) -> np.ndarray:
    """Binary frames of a (columns, rows, slices) label map: bool (slices, rows, columns, segments).

    The label map's axes are those of :func:`aqcf.data.dicom.dicom_series_to_volume` (the NIfTI
    written for a DICOM input), so frame k is source slice k of the volume order, transposed to the
    DICOM (rows, columns) layout.
    """
    labels = np.asarray(labels)
    planes = np.transpose(labels, (2, 1, 0))  # (X=columns, Y=rows, Z) -> (slices, rows, columns)
    return np.stack([region_mask(planes, name) for name, _, _, _ in SEGMENTS], axis=-1)


def write_dicom_seg(path: str | Path, labels: np.ndarray, source_slices: Sequence) -> Path:
    """Write ``labels`` as a BINARY DICOM Segmentation of ``source_slices``, atomically.

    Args:
        path: the ``.dcm`` to write.
        labels: uint8 (columns, rows, slices) labels 0/1/2 on the grid of the DICOM input's volume.
        source_slices: the series' pydicom datasets in volume order (slice k is ``labels[..., k]``).

    Raises:
        AqcfError: highdicom missing, or source slices that lack what a Segmentation must copy
            (patient, study, frame of reference); the message names the file.
    """
    require_highdicom()
    import highdicom as hd
    from pydicom.sr.coding import Code

    from aqcf.io import atomic_path

    frames = segment_frames(labels)
    if frames.shape[0] != len(source_slices):
        raise AqcfError(f"{path}: {frames.shape[0]} mask slices for {len(source_slices)} source slices")
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="A-QCF-Net", family=codes.cid7162.ArtificialIntelligence, version=_version()
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=Code(category[0], "SCT", category[1]),
            segmented_property_type=Code(kind[0], "SCT", kind[1]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, (label, _, category, kind) in enumerate(SEGMENTS, start=1)
    ]
    first = copy.deepcopy(source_slices[0])
    for keyword in _TYPE2:
        if keyword not in first:
            setattr(first, keyword, "")
    if "SliceThickness" not in first and len(source_slices) > 1:
        # the Segmentation's pixel measures need one; take the slice spacing, as the stacked volume does
        step = np.subtract(source_slices[1].ImagePositionPatient, source_slices[0].ImagePositionPatient)
        first.SliceThickness = float(np.linalg.norm(step))
    try:
        seg = hd.seg.Segmentation(
            source_images=[first, *source_slices[1:]],
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="aqcf",
            manufacturer_model_name="A-QCF-Net",
            software_versions=_version(),
            device_serial_number="0",
            series_description="A-QCF-Net liver and tumor",
            omit_empty_frames=False,
        )
    except Exception as err:  # highdicom raises several types for source slices it cannot reference
        raise AqcfError(f"{path}: cannot build a DICOM Segmentation of this series ({first_line(err)})") from err
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return Path(path)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aqcf")
    except PackageNotFoundError:
        return "unknown"
