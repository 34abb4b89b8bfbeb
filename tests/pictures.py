"""Where colour lands in a drawn figure: the pixel under a data point of an axes, label colours.

A figure rendered (or saved) at its own dpi has the pixel grid of matplotlib's display coordinates, so
``ax.transData`` says which pixel of the picture shows a data point (scaled for a PNG saved at another
dpi); for an ``imshow`` panel, the data point ``(column, row)`` is the centre of that image cell.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np

from aqcf.visualize.canvas import figure_to_rgb

# a label colour blended at the overlays' opacity (0.4) leads the other channels by ~0.4; the grey
# image, the text and the frame lead by nothing
DOMINANT = 0.3


def rendered(fig) -> np.ndarray:
    """``fig`` as (H, W, 3) floats in [0, 1]."""
    return figure_to_rgb(fig).astype(np.float64) / 255.0


def read_png(path) -> np.ndarray:
    """A PNG as (H, W, 3) floats in [0, 1]."""
    return np.asarray(mpimg.imread(path), dtype=np.float64)[..., :3]


def pixel(ax, x: float, y: float, rgb: np.ndarray) -> tuple[int, int]:
    """(row, column) of the picture ``rgb`` of ``ax``'s figure that shows data point (x, y) of ``ax``
    (a PNG saved at another dpi than the figure's is scaled by the ratio of the widths)."""
    scale = rgb.shape[1] / ax.figure.bbox.width
    px, py = ax.transData.transform((x, y)) * scale
    return int(rgb.shape[0] - py), int(px)


def colour_at(rgb: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """The RGB colour shown at data point (x, y) of ``ax``."""
    row, col = pixel(ax, x, y, rgb)
    return rgb[row, col]


def near(rgb: np.ndarray, ax, x: float, y: float, colour, radius: int = 2, tol: float = 0.2) -> bool:
    """Whether a pixel within ``radius`` of data point (x, y) has ``colour`` (each channel within ``tol``)."""
    row, col = pixel(ax, x, y, rgb)
    patch = rgb[max(row - radius, 0) : row + radius + 1, max(col - radius, 0) : col + radius + 1]
    return bool((np.abs(patch - np.asarray(colour, dtype=np.float64)).max(axis=-1) <= tol).any())


def panel(rgb: np.ndarray, ax, inset: int = 3) -> np.ndarray:
    """The pixels inside ``ax``'s box, ``inset`` pixels in from its frame."""
    scale = rgb.shape[1] / ax.figure.bbox.width
    x0, y0, x1, y1 = np.asarray(ax.get_window_extent().extents) * scale
    top, bottom = int(rgb.shape[0] - y1) + inset, int(rgb.shape[0] - y0) - inset
    return rgb[top:bottom, int(x0) + inset : int(x1) - inset]


def blue(pixels: np.ndarray) -> np.ndarray:
    """Where blue leads red and green by more than :data:`DOMINANT` (tumor)."""
    return pixels[..., 2] - pixels[..., :2].max(axis=-1) > DOMINANT


def red(pixels: np.ndarray) -> np.ndarray:
    """Where red leads green and blue by more than :data:`DOMINANT` (liver)."""
    return pixels[..., 0] - pixels[..., 1:].max(axis=-1) > DOMINANT


def grey(pixels: np.ndarray, tol: float = 2.5 / 255) -> np.ndarray:
    """Where R = G = B (up to rounding)."""
    return (np.ptp(pixels, axis=-1) <= tol)


def view_cell(x: int, y: int, shape_xy: tuple[int, int], codes: str) -> tuple[int, int]:
    """(column, row) of voxel (x, y) of an axial slice in radiological view: the patient's right on the
    viewer's left, anterior on top; ``codes`` the volume's axis codes (``"RAS"``: x toward the right,
    y toward anterior; ``"LAS"``: x toward the left, ...)."""
    column = shape_xy[0] - 1 - x if codes[0] == "R" else x
    row = shape_xy[1] - 1 - y if codes[1] == "A" else y
    return column, row


def ras_cell(x: int, y: int, shape_xy: tuple[int, int]) -> tuple[int, int]:
    """:func:`view_cell` of an RAS slice: the largest x in the first column, the largest y in the top row."""
    return view_cell(x, y, shape_xy, "RAS")


def keep_figures(monkeypatch, module, into: dict) -> None:
    """Record every figure ``module.save_figure`` writes, ``into[file name] = figure``, and still write it."""
    save = module.save_figure

    def keeping(fig, path, *args, **kwargs):
        into[Path(path).name] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(module, "save_figure", keeping)
