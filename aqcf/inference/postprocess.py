"""Post-processing of a label map (0 background, 1 liver, 2 tumor) on the scan's own grid.

``largest-liver``: the liver is one organ, so every liver component but the largest is a false
positive (a spleen or kidney taken for liver); a tumor is a liver tumor, so tumor voxels outside the
kept liver go too. Liver here is labels {1, 2} (the liver includes its tumors), components are
26-connected (the connectivity of the tumor count in :mod:`aqcf.inference.measures`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from aqcf.constants import region_mask

__all__ = ["POSTPROCESSING", "keep_largest_liver", "postprocess"]

#: the ``--postprocess`` choices
POSTPROCESSING = ("none", "largest-liver")


def keep_largest_liver(labels: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of the liver (labels 1 and 2); everything else becomes 0.

    Tumor voxels inside the kept component stay 2; tumor outside it is dropped with its component.
    Ties between equally large components keep the one scipy numbers first.

    Args:
        labels: integer (X, Y, Z) labels 0/1/2.

    Returns:
        uint8 labels of the same shape.
    """
    labels = np.asarray(labels)
    components, count = ndimage.label(region_mask(labels, "liver"), structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return labels.astype(np.uint8)
    sizes = np.bincount(components.ravel())[1:]
    kept = components == 1 + int(np.argmax(sizes))
    return np.where(kept, labels, 0).astype(np.uint8)


def postprocess(labels: np.ndarray, method: str = "none") -> np.ndarray:
    """Apply one of :data:`POSTPROCESSING` to a label map (``"none"`` returns it unchanged)."""
    if method == "none":
        return labels
    if method == "largest-liver":
        return keep_largest_liver(labels)
    raise ValueError(f"post-processing {method!r}: need one of {POSTPROCESSING}")
