"""Names used everywhere: modalities, batch keys, classes."""

from __future__ import annotations

from aqcf.errors import AqcfError

__all__ = ["CT", "MRI", "MODALITIES", "IMAGE", "LABEL", "CLASS_NAMES", "FOREGROUND_CLASSES", "check_modality"]

CT = "ct"
MRI = "mri"
MODALITIES = (CT, MRI)
IMAGE = "image"
LABEL = "label"
CLASS_NAMES = ("background", "liver", "tumor")
FOREGROUND_CLASSES = {"liver": 1, "tumor": 2}


def check_modality(modality: str) -> str:
    """Return ``modality`` lower-cased if it is ``"ct"`` or ``"mri"``, else raise :class:`AqcfError`."""
    value = str(modality).lower()
    if value not in MODALITIES:
        raise AqcfError(f"modality {modality!r} is neither 'ct' nor 'mri'")
    return value
