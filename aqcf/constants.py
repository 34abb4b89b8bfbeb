"""Names used everywhere: modalities, batch keys, classes."""

from __future__ import annotations

from collections.abc import Sequence

from aqcf.errors import AqcfError

__all__ = [
    "CT",
    "MRI",
    "MODALITIES",
    "IMAGE",
    "LABEL",
    "CLASS_NAMES",
    "FOREGROUND_CLASSES",
    "check_modality",
    "check_name",
    "declare_modalities",
    "known_modalities",
]

CT = "ct"
MRI = "mri"
MODALITIES = (CT, MRI)
IMAGE = "image"
LABEL = "label"
CLASS_NAMES = ("background", "liver", "tumor")
FOREGROUND_CLASSES = {"liver": 1, "tumor": 2}


# further stream names, declared where they enter: a config's data.cohorts, a network's modalities
_DECLARED: dict[str, None] = {}


def check_name(modality: str) -> str:
    """Return ``modality`` lower-cased if it can name a stream (an identifier), else raise :class:`AqcfError`."""
    value = str(modality).lower()
    if not value.isidentifier():
        raise AqcfError(f"modality {modality!r} is not a name (letters, digits, underscores)")
    return value


def declare_modalities(names: Sequence[str]) -> tuple[str, ...]:
    """Make the stream names a data module or model declares (``("ct", "mri", "t2")``) known to
    :func:`check_modality` in this process; returns them lower-cased."""
    values = tuple(check_name(n) for n in names)
    _DECLARED.update((v, None) for v in values if v not in MODALITIES)
    return values


def known_modalities() -> tuple[str, ...]:
    """``("ct", "mri")`` and the names declared by :func:`declare_modalities`."""
    return (*MODALITIES, *_DECLARED)


def check_modality(modality: str, allowed: Sequence[str] | None = None) -> str:
    """Return ``modality`` lower-cased if it is one of ``allowed``, else raise :class:`AqcfError`.

    Args:
        modality: a stream / cohort name, any case.
        allowed: the names accepted; ``None`` (default): ``"ct"``, ``"mri"`` and the names declared
            by :func:`declare_modalities` (a config's further cohorts, e.g. ``"t2"``).
    """
    value = str(modality).lower()
    declared = allowed is None
    allowed = known_modalities() if declared else tuple(allowed)
    if value not in allowed:
        if allowed == MODALITIES:
            raise AqcfError(f"modality {modality!r} is neither 'ct' nor 'mri'")
        if declared:
            raise AqcfError(
                f"modality {modality!r} is neither 'ct' nor 'mri' nor a declared cohort ({', '.join(_DECLARED)})"
            )
        raise AqcfError(f"modality {modality!r} is none of {', '.join(allowed)}")
    return value
