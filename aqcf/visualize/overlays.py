"""Label overlays on axial slices: the pictures of the validation log, the demo report and Figures 5/6.

Figures come from :func:`aqcf.visualize.canvas.new_figure` (an Agg canvas, no ``pyplot``).

Display convention (radiological): an axial slice is shown as seen from the patient's feet, with the
patient's right on the viewer's left and anterior at the top. Volumes are indexed ``(x, y, z)`` as
nibabel returns them, so a slice ``volume[:, :, k]`` has x along its first axis and is transposed for
display (rows = y, columns = x) and then flipped according to the volume's axis codes (``"RAS"``
after MONAI's ``Orientation("RAS")`` or nibabel's ``as_closest_canonical``; ``"LAS"`` and the other
codes are handled too).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from aqcf.constants import LIVER, TUMOR
from aqcf.errors import AqcfError
from aqcf.visualize.canvas import DPI, new_figure, save_figure

__all__ = [
    "LIVER_RGB",
    "TUMOR_RGB",
    "robust_window",
    "to_display",
    "overlay",
    "pick_slices",
    "overlay_grid",
    "save_overlay_png",
]

LIVER_RGB = (1.0, 0.0, 0.0)
TUMOR_RGB = (0.0, 0.0, 1.0)
LABEL_COLOURS = {LIVER: LIVER_RGB, TUMOR: TUMOR_RGB}

# Percentiles of the grey window: a few bright voxels (bone, contrast, bias-field peaks) would
# otherwise compress the soft tissue to a narrow band of greys.
WINDOW_PERCENTILES = (1.0, 99.0)
PANEL_INCHES = 2.2


def robust_window(
    image: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES
) -> tuple[float, float]:
    """Return the grey window ``(low, high)`` of ``image`` at the given percentiles (image units, e.g. HU).

    Args:
        image: any-shaped float array.
        percentiles: lower and upper percentile in [0, 100].
    """
    finite = np.asarray(image, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, percentiles)
    return float(low), float(high)


def to_display(slice_xy: np.ndarray, orientation: str = "RAS") -> np.ndarray:
    """Turn an axial slice indexed ``(x, y)`` into a display array ``(rows, columns)`` in radiological view.

    Args:
        slice_xy: (X, Y) array, a slice ``volume[:, :, k]`` of a volume whose first two axis codes are
            ``orientation[:2]``.
        orientation: the volume's axis codes (nibabel ``aff2axcodes`` letters), e.g. ``"RAS"``,
            ``"LAS"``, ``"LPS"``: x must run along R/L and y along A/P.

    Returns:
        (Y, X) array: rows run from anterior (top) to posterior, columns from the patient's right
        (viewer's left) to the patient's left.
    """
    codes = str(orientation).upper()
    if len(codes) < 2 or codes[0] not in "RL" or codes[1] not in "AP":
        raise AqcfError(
            f"orientation {orientation!r}: the first two axis codes must be R/L and A/P (e.g. 'RAS')"
        )
    shown = np.asarray(slice_xy).T
    if codes[1] == "A":  # y grows toward anterior: put the largest y on the top row
        shown = shown[::-1, :]
    if codes[0] == "R":  # x grows toward the patient's right: put the largest x on the viewer's left
        shown = shown[:, ::-1]
    return shown


def overlay(
    image_slice: np.ndarray,
    label_slice: np.ndarray,
    alpha: float = 0.4,
    window: tuple[float, float] | None = None,
    orientation: str = "RAS",
) -> np.ndarray:
    """Blend a label slice over a grey image slice: liver (label 1) red, tumor (label 2) blue.

    The grey level is the image scaled linearly from ``window`` (default: its 1st and 99th
    percentile, a robust min/max) to [0, 1] and clipped; a labelled pixel becomes
    ``(1 - alpha) * grey + alpha * colour``; unlabelled pixels stay grey (R = G = B). The result is in
    radiological view, see :func:`to_display`: the array's first axis is x, so it is transposed for
    display.

    Args:
        image_slice: (X, Y) float, an axial slice (image units, e.g. HU).
        label_slice: (X, Y) int, labels 0 background, 1 liver, 2 tumor (other values are not drawn).
        alpha: opacity of the label colour in [0, 1].
        window: grey window ``(low, high)`` in image units; None: the slice's robust min/max.
        orientation: axis codes of the volume the slice comes from (``"RAS"``, ``"LAS"``, ...).

    Returns:
        (Y, X, 3) uint8 RGB image.
    """
    image_slice = np.asarray(image_slice, dtype=np.float64)
    label_slice = np.asarray(label_slice)
    if image_slice.ndim != 2 or image_slice.shape != label_slice.shape:
        raise AqcfError(
            f"overlay: image slice {image_slice.shape} and label slice {label_slice.shape} "
            "must be equal 2-D shapes"
        )
    if not 0.0 <= alpha <= 1.0:
        raise AqcfError(f"overlay: alpha {alpha} outside [0, 1]")
    low, high = robust_window(image_slice) if window is None else window
    grey = np.clip((image_slice - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(image_slice)
    grey = np.nan_to_num(grey)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value, colour in LABEL_COLOURS.items():
        where = label_slice == value
        rgb[where] = (1.0 - alpha) * rgb[where] + alpha * np.asarray(colour)
    shown = np.stack([to_display(rgb[..., c], orientation) for c in range(3)], axis=-1)
    return np.round(shown * 255.0).astype(np.uint8)


def _spread_pick(ranked: Sequence[int], n: int, min_gap: int) -> list[int]:
    chosen: list[int] = []
    for z in ranked:
        if len(chosen) == n:
            break
        if all(abs(z - c) >= min_gap for c in chosen):
            chosen.append(int(z))
    for z in ranked:  # not enough slices far enough apart: fill with the best of the rest
        if len(chosen) == n:
            break
        if z not in chosen:
            chosen.append(int(z))
    return chosen


def pick_slices(label: np.ndarray, n: int = 3) -> list[int]:
    """Choose ``n`` axial slices worth showing: the most tumor, else the most foreground, spread out.

    Slices are ranked by tumor area, then (for slices without tumor) by foreground area, then by
    closeness to the middle of the foreground. They are taken greedily from that ranking while
    keeping at least ``ceil(span / n)`` slices between any two, where ``span`` is the z extent of the
    best tier (the tumor slices if there are any, else the foreground slices), so that one large
    tumor does not fill every row with neighbouring slices; when too few are far enough apart, the
    best remaining are added. A volume without foreground gets ``n`` slices around the middle,
    ``Z // (n + 1)`` apart.

    Args:
        label: (X, Y, Z) int label volume (0 background, 1 liver, 2 tumor).
        n: number of slices wanted (fewer when the volume has fewer slices).

    Returns:
        Sorted z indices.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise AqcfError(f"pick_slices: label must be a 3-D (X, Y, Z) volume, got shape {label.shape}")
    depth = label.shape[2]
    n = min(int(n), depth)
    if n <= 0:
        return []
    tumor = (label == TUMOR).sum(axis=(0, 1))
    foreground = (label > 0).sum(axis=(0, 1))
    if not foreground.any():
        by_middle = np.argsort(np.abs(np.arange(depth) - 0.5 * (depth - 1)), kind="stable")
        return sorted(_spread_pick(by_middle.tolist(), n, max(1, depth // (n + 1))))
    fg_slices = np.flatnonzero(foreground)
    centre = 0.5 * (fg_slices[0] + fg_slices[-1])
    # lexicographic ranking: tumor area, foreground area, closeness to the foreground's middle
    order = np.lexsort((np.abs(np.arange(depth) - centre), -foreground, -tumor))
    best_tier = np.flatnonzero(tumor) if tumor.any() else fg_slices
    span = int(best_tier[-1] - best_tier[0] + 1)
    min_gap = max(1, -(-span // n))
    return sorted(_spread_pick(order.tolist(), n, min_gap))


def overlay_grid(
    image: np.ndarray,
    columns: Mapping[str, np.ndarray],
    slices: Sequence[int],
    alpha: float = 0.4,
    orientation: str = "RAS",
    title: str | None = None,
    spacing: Sequence[float] | None = None,
) -> Figure:
    """Draw a grid of overlays: one row per axial slice, one column per label volume.

    The grey window is the robust min/max of the whole ``image`` so that all panels share it.

    Args:
        image: (X, Y, Z) float volume (e.g. HU).
        columns: column title -> (X, Y, Z) int label volume, e.g. ``{"ground truth": gt,
            "prediction": pred}``; drawn left to right in the mapping's order.
        slices: z indices, one row each.
        alpha: opacity of the label colours.
        orientation: the volume's axis codes, see :func:`to_display`.
        title: optional figure title.
        spacing: voxel size (sx, sy, ...) in mm, so that pixels are drawn with their true in-plane
            aspect; None: square pixels.

    Returns:
        A matplotlib ``Figure`` on an Agg canvas (save it with :func:`save_figure`).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise AqcfError(f"overlay_grid: image must be a 3-D (X, Y, Z) volume, got shape {image.shape}")
    if not columns:
        raise AqcfError("overlay_grid: no label volume to draw")
    for name, volume in columns.items():
        if np.shape(volume) != image.shape:
            raise AqcfError(f"overlay_grid: {name!r} has shape {np.shape(volume)}, image has {image.shape}")
    slices = [int(z) for z in slices]
    if not slices or any(not 0 <= z < image.shape[2] for z in slices):
        raise AqcfError(f"overlay_grid: slices {slices} outside 0..{image.shape[2] - 1}")
    window = robust_window(image)
    n_rows, n_cols = len(slices), len(columns)
    pixel_aspect = 1.0 if spacing is None else float(spacing[1]) / float(spacing[0])
    height_ratio = image.shape[1] * pixel_aspect / image.shape[0]
    fig = new_figure((PANEL_INCHES * n_cols, PANEL_INCHES * height_ratio * n_rows + 0.6), dpi=DPI)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for row, z in enumerate(slices):
        for col, (name, volume) in enumerate(columns.items()):
            ax = axes[row, col]
            shown = overlay(image[:, :, z], np.asarray(volume)[:, :, z], alpha, window, orientation)
            ax.imshow(shown, aspect=pixel_aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"z = {z}", fontsize=8)
    handles = [Patch(color=LIVER_RGB, label="liver"), Patch(color=TUMOR_RGB, label="tumor")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95 if title else 1))
    return fig


def save_overlay_png(
    path: str | os.PathLike,
    image: np.ndarray,
    columns: Mapping[str, np.ndarray],
    n_slices: int = 3,
    title: str | None = None,
    slices: Sequence[int] | None = None,
    alpha: float = 0.4,
    orientation: str = "RAS",
    spacing: Sequence[float] | None = None,
) -> Path:
    """Pick slices from the first column's labels (the reference), draw :func:`overlay_grid`, save a PNG.

    Args:
        path: destination ``.png`` (written atomically).
        image: (X, Y, Z) float volume.
        columns: column title -> (X, Y, Z) label volume; the first one chooses the slices.
        n_slices: number of rows when ``slices`` is None (see :func:`pick_slices`).
        title: optional figure title.
        slices: explicit z indices instead of :func:`pick_slices`.
        alpha: opacity of the label colours.
        orientation: the volume's axis codes, see :func:`to_display`.
        spacing: voxel size in mm (true pixel aspect), or None for square pixels.

    Returns:
        The path written.
    """
    if not columns:
        raise AqcfError(f"{path}: no label volume to draw")
    if slices is None:
        slices = pick_slices(np.asarray(next(iter(columns.values()))), n_slices)
    fig = overlay_grid(
        image, columns, slices, alpha=alpha, orientation=orientation, title=title, spacing=spacing
    )
    return save_figure(fig, path)
