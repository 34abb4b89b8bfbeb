"""The one place figures are made and written: matplotlib's object API on an Agg canvas.

No ``pyplot``, no screen, no global backend switch: every figure of the package comes from
:func:`new_figure`, so drawing is safe inside training processes and on headless machines.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from aqcf.io import atomic_path

__all__ = ["DPI", "new_figure", "save_figure", "figure_to_rgb"]

DPI = 100


def new_figure(figsize: tuple[float, float], dpi: int = DPI) -> Figure:
    """A figure of ``figsize`` inches on its own Agg canvas.

    Args:
        figsize: (width, height) in inches.
        dpi: resolution of the canvas.

    Returns:
        The empty figure.
    """
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG atomically (a temporary file in the same folder, then ``os.replace``).

    Args:
        fig: the figure.
        path: destination ``.png``; missing parent folders are created.
        dpi: resolution.

    Returns:
        The destination path.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` to an (H, W, 3) uint8 array (for loggers that take images, e.g. ``wandb.Image``)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
