"""The analysed window of a case (paper section 4.3): one training-patch-sized window centred on the
largest tumor, or the whole volume padded to the network's divisor.

Pure NumPy/SciPy functions: :func:`window_centre` picks the centre, :func:`extract_window` cuts the
window out of a preprocessed volume and says where it lies (:class:`Window`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aqcf.constants import TUMOR
from aqcf.errors import AqcfError

__all__ = ["Window", "window_centre", "extract_window"]



@dataclass(frozen=True)
class Window:
    """Where a window lies in a volume.

    Attributes:
        start: first voxel of the window per axis, in the volume's indices (negative where the volume
            was zero-padded because it is smaller than the window).
        size: window size (X, Y, Z) in voxels.
        centred_on: ``"tumor"``, ``"liver"``, ``"volume"`` (what the window was centred on) or
            ``"whole"`` (the whole volume, padded to the network's divisor).
    """

    start: tuple[int, int, int]
    size: tuple[int, int, int]
    centred_on: str


def window_centre(label: np.ndarray) -> tuple[np.ndarray, str]:
    """Centre of the largest tumor component, else of the liver (labels 1 and 2), else of the volume.

    Args:
        label: (X, Y, Z) integer labels 0/1/2.

    Returns:
        ``(centre, what)``: the centre in voxel coordinates and ``"tumor"``, ``"liver"`` or ``"volume"``.
    """
    from scipy import ndimage

    label = np.asarray(label)
    tumor = label == TUMOR
    if tumor.any():
        components, n = ndimage.label(tumor)
        sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
        largest = components == 1 + int(np.argmax(sizes))
        return np.asarray(ndimage.center_of_mass(largest)), "tumor"
    if (label > 0).any():
        return np.asarray(ndimage.center_of_mass(label > 0)), "liver"
    return (np.asarray(label.shape) - 1) / 2.0, "volume"


def extract_window(
    image: np.ndarray,
    label: np.ndarray,
    size: Sequence[int] | None,
    divisor: int = 1,
) -> tuple[np.ndarray, np.ndarray, Window]:
    """Cut the analysed window out of a preprocessed volume.

    With ``size`` given, the window has that size and is centred on :func:`window_centre`, shifted to
    lie inside the volume; a volume smaller than the window along an axis is first zero-padded
    symmetrically (as training pads such volumes). With ``size=None`` the window is the whole volume,
    zero-padded at the end of each axis up to a multiple of ``divisor``.

    Args:
        image: (X, Y, Z) preprocessed image (intensities in [0, 1]).
        label: (X, Y, Z) labels on the same grid.
        size: window (X, Y, Z) in voxels (the training patch), or None.
        divisor: every window axis must be a multiple of this (the network's ``2**stages``).

    Returns:
        ``(image_window, label_window, window)``.
    """
    image, label = np.asarray(image), np.asarray(label)
    if image.shape != label.shape or image.ndim != 3:
        raise AqcfError(f"image {image.shape} and label {label.shape} must be equal 3-D shapes")
    shape = np.asarray(image.shape)
    if size is None:
        target = -(-shape // divisor) * divisor
        pad = [(0, int(t - s)) for s, t in zip(shape, target, strict=True)]
        window = Window((0, 0, 0), tuple(int(t) for t in target), "whole")
        return np.pad(image, pad), np.pad(label, pad), window
    size = np.asarray([int(s) for s in size])
    if size.shape != (3,) or (size < 1).any() or (size % divisor).any():
        raise AqcfError(f"window size {tuple(size)}: need three sizes, each a multiple of {divisor}")
    missing = np.maximum(size - shape, 0)
    before = missing // 2
    pad = [(int(b), int(m - b)) for b, m in zip(before, missing, strict=True)]
    image, label = np.pad(image, pad), np.pad(label, pad)
    centre, what = window_centre(label)
    start = np.clip(np.round(centre - size / 2.0).astype(int), 0, np.asarray(label.shape) - size)
    box = tuple(slice(int(a), int(a + s)) for a, s in zip(start, size, strict=True))
    window = Window(tuple(int(a - b) for a, b in zip(start, before, strict=True)), tuple(int(s) for s in size), what)
    return image[box], label[box], window
