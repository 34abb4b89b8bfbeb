"""Names used everywhere: modalities, batch keys, and the label vocabulary with its one check.

Label maps hold 0 background, 1 liver, 2 tumor (:data:`CLASS_NAMES`, index = value). The evaluated
regions are sets of those values (:data:`REGIONS`): ``liver`` is the whole liver with its tumors,
{1, 2}, as in LiTS; ``tumor`` is {2}. :func:`region_mask` turns a label map into one region's mask
and :func:`check_label_values` is the one test of a label map's values.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np

from aqcf.errors import AqcfError

__all__ = [
    "CT",
    "MRI",
    "MODALITIES",
    "IMAGE",
    "LABEL",
    "BACKGROUND",
    "LIVER",
    "TUMOR",
    "CLASS_NAMES",
    "LABEL_VALUES",
    "FOREGROUND_CLASSES",
    "REGIONS",
    "region_mask",
    "check_label_values",
    "check_modality",
    "check_name",
    "check_stream",
]

CT = "ct"
MRI = "mri"
MODALITIES = (CT, MRI)
IMAGE = "image"
LABEL = "label"

# ------------------------------------------------------------------------------------ label vocabulary
BACKGROUND, LIVER, TUMOR = 0, 1, 2
#: the class of each label value (index = value)
CLASS_NAMES = ("background", "liver", "tumor")
#: the values a label map may hold
LABEL_VALUES = tuple(range(len(CLASS_NAMES)))
#: class name -> label value, background left out
FOREGROUND_CLASSES = {"liver": LIVER, "tumor": TUMOR}
#: evaluated region -> the label values it covers: the liver includes its tumors (the LiTS convention)
REGIONS: dict[str, tuple[int, ...]] = {"liver": (LIVER, TUMOR), "tumor": (TUMOR,)}
# label values shown in a one-line message before it is cut short
_MAX_SHOWN = 5


def region_mask(label, region: str):
    """The boolean mask of one evaluated region (:data:`REGIONS`) in a label map.

    Args:
        label: label values 0/1/2, a numpy array or a torch tensor of any shape.
        region: ``"liver"`` (labels 1 and 2) or ``"tumor"`` (label 2).

    Returns:
        A boolean array or tensor (as ``label`` is) of ``label``'s shape.
    """
    values = REGIONS[region]
    mask = label == values[0]
    for value in values[1:]:
        mask = mask | (label == value)
    return mask


def _present_values(array: np.ndarray) -> np.ndarray:
    """The distinct values of an array; integer-valued floats are counted like integers (no sort)."""
    if array.dtype.kind == "f" and array.size:
        whole = np.isfinite(array) & (array == np.floor(array))
        if not whole.all():
            bad = np.unique(array[~whole])
            good = _present_values(array[whole].astype(np.int64)) if whole.any() else np.zeros(0)
            return np.concatenate([good.astype(float), bad])
        array = array.astype(np.int64)
    if array.dtype.kind in "ub" or (array.dtype.kind == "i" and array.size and array.min() >= 0):
        counts = np.bincount(array.ravel().astype(np.int64, copy=False)) if array.size else np.zeros(0)
        return np.flatnonzero(counts)
    return np.unique(array)


def check_label_values(path: str | PathLike, array) -> np.ndarray:
    """Check that a label map holds only the values of :data:`LABEL_VALUES` (0, 1, 2).

    Integers, bools and floats holding whole numbers (a float-stored mask) are accepted.

    Args:
        path: the label file, or how the message names the array (``"case 'x' prediction"``).
        array: its voxels (a numpy array or a CPU torch tensor).

    Returns:
        The sorted values present, as integers.

    Raises:
        AqcfError: ``"<path>: label values {3, 0.5} outside {0, 1, 2}"``: a value outside {0, 1, 2},
            fractions and NaN included, naming the file and up to five of the values.
    """
    values = _present_values(np.asarray(array))
    bad = [v for v in values.tolist() if v not in LABEL_VALUES]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:_MAX_SHOWN]) + (", ..." if len(bad) > _MAX_SHOWN else "")
        allowed = ", ".join(str(v) for v in LABEL_VALUES)
        raise AqcfError(f"{path}: label values {{{shown}}} outside {{{allowed}}}")
    return values.astype(np.int64)


# ------------------------------------------------------------------------------------------ modalities


def check_name(modality: str) -> str:
    """Return ``modality`` lower-cased if it can name a stream (an identifier), else raise :class:`AqcfError`.

    A stream or cohort of any name (``"t2"``, ``"pet"``) passes: which names a model or a data module
    accepts is theirs to say (:func:`check_modality` with their names).
    """
    value = str(modality).lower()
    if not value.isidentifier():
        raise AqcfError(f"modality {modality!r} is not a name (letters, digits, underscores)")
    return value


def check_modality(modality: str, allowed: Sequence[str] = MODALITIES) -> str:
    """Return ``modality`` lower-cased if it is one of ``allowed``, else raise :class:`AqcfError`.

    Args:
        modality: a stream / cohort name, any case.
        allowed: the names accepted (default ``"ct"`` and ``"mri"``); a network's or a data module's
            ``modalities`` where further cohorts (``"t2"``) may occur.
    """
    value = str(modality).lower()
    allowed = tuple(allowed)
    if value not in allowed:
        if allowed == MODALITIES:
            raise AqcfError(f"modality {modality!r} is neither 'ct' nor 'mri'")
        raise AqcfError(f"modality {modality!r} is none of {', '.join(allowed)}")
    return value


def check_stream(modality: str, network: object) -> str:
    """Return ``modality`` lower-cased if ``network`` has a stream of that name, else raise :class:`AqcfError`.

    The streams are the network's ``modalities`` attribute (``("ct", "mri", "t2")`` for three
    cohorts); a network without one serves ``"ct"`` and ``"mri"``.
    """
    return check_modality(modality, getattr(network, "modalities", MODALITIES))
