"""Per-case map grids: the image, the ground truth and heat maps of one axial slice per row.

Figure 7 (:func:`plot_saliency`: Grad-CAM heat maps over the grey image, the ground-truth tumor
outlined) and Figure 8 (:func:`plot_feature_maps`: channel-summarised feature maps) share one layout,
:func:`case_map_grid`. Every panel is in radiological view (:func:`aqcf.visualize.overlays.to_display`).
The maps arrive as plain (X, Y) arrays in [0, 1]; the callers compute them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from aqcf.constants import TUMOR
from aqcf.errors import AqcfError
from aqcf.visualize.canvas import DPI, new_figure
from aqcf.visualize.overlays import overlay, to_display

__all__ = [
    "SALIENCY_CMAP",
    "FEATURE_CMAP",
    "display_slice",
    "case_map_grid",
    "plot_saliency",
    "plot_feature_maps",
]

SALIENCY_CMAP = "jet"  # the colour map of the Grad-CAM papers
SALIENCY_ALPHA = 0.45
FEATURE_CMAP = "viridis"
PANEL_INCHES = 2.0
IMAGE, GROUND_TRUTH = "image", "ground truth"

#: ``draw_map(ax, heat, grey, label, orientation, aspect)``: one map panel, ``heat`` and ``grey`` in
#: display orientation, ``label`` the (X, Y) label slice as given
DrawMap = Callable[[Axes, np.ndarray, np.ndarray, np.ndarray, str, float], None]


def display_slice(slice_xy: np.ndarray, orientation: str) -> np.ndarray:
    """An (X, Y) slice in radiological view (:func:`aqcf.visualize.overlays.to_display`), or plainly
    transposed when the volume's first two axis codes are not R/L and A/P."""
    try:
        return to_display(slice_xy, orientation)
    except AqcfError:
        return np.asarray(slice_xy).T


def case_map_grid(
    rows: Sequence[Mapping[str, object]],
    draw_map: DrawMap,
    what: str,
    title: str | None = None,
) -> Figure:
    """A figure with one row per case: the image, the ground truth, then one panel per map.

    Args:
        rows: one mapping per case with ``"name"`` (row label), ``"image"`` (X, Y) slice in [0, 1],
            ``"label"`` (X, Y) labels, ``"maps"`` ``{title: (X, Y) in [0, 1]}`` (the same titles in every
            row), ``"orientation"`` (axis codes, e.g. ``"RAS"``) and ``"spacing"`` (mm, for the pixel
            aspect).
        draw_map: draws one map panel (see :data:`DrawMap`).
        what: the figure's name in the error for an empty ``rows``.
        title: optional figure title.

    Returns:
        A matplotlib figure on an Agg canvas (save it with :func:`aqcf.visualize.canvas.save_figure`).
    """
    if not rows:
        raise AqcfError(f"{what}: no case to draw")
    columns = [IMAGE, GROUND_TRUTH, *rows[0]["maps"]]
    first = np.asarray(rows[0]["image"])
    fig = new_figure(
        (PANEL_INCHES * len(columns), PANEL_INCHES * len(rows) * first.shape[1] / first.shape[0] + 0.6), dpi=DPI
    )
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows):
        _draw_row(axes[r], row, columns, draw_map)
        axes[r, 0].set_ylabel(str(row["name"]), fontsize=8)
    for ax, column in zip(axes[0], columns, strict=True):
        ax.set_title(column, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95 if title else 1))
    return fig


def _draw_row(axes: Sequence[Axes], row: Mapping[str, object], columns: Sequence[str], draw_map: DrawMap) -> None:
    """One case's panels: the grey image, the ground-truth overlay, then ``draw_map`` for each map."""
    orientation = str(row["orientation"])
    spacing = row.get("spacing")
    aspect = 1.0 if spacing is None else float(spacing[1]) / float(spacing[0])
    image = np.asarray(row["image"], dtype=np.float64)
    label = np.asarray(row["label"])
    grey = display_slice(image, orientation)
    for ax, column in zip(axes, columns, strict=True):
        if column == IMAGE:
            ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
        elif column == GROUND_TRUTH:
            shown = overlay(image, label, window=(0.0, 1.0), orientation=orientation)
            ax.imshow(shown, aspect=aspect, interpolation="nearest")
        else:
            heat = display_slice(np.asarray(row["maps"][column]), orientation)
            draw_map(ax, heat, grey, label, orientation, aspect)
        ax.set_xticks([])
        ax.set_yticks([])


def _draw_saliency(ax: Axes, heat, grey, label, orientation: str, aspect: float) -> None:
    """A heat map over the grey image, the ground-truth tumor outlined in white."""
    ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
    ax.imshow(heat, cmap=SALIENCY_CMAP, vmin=0.0, vmax=1.0, alpha=SALIENCY_ALPHA, aspect=aspect)
    tumor = display_slice((np.asarray(label) == TUMOR).astype(float), orientation)
    if tumor.any():
        ax.contour(tumor, levels=[0.5], colors="white", linewidths=0.8)


def _draw_features(ax: Axes, heat, grey, label, orientation: str, aspect: float) -> None:
    """A feature map on its own, in the feature colour map."""
    ax.imshow(heat, cmap=FEATURE_CMAP, vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")


def plot_saliency(rows: Sequence[Mapping[str, object]], title: str | None = None) -> Figure:
    """Figure 7: per row the image, the ground truth and the saliency heat maps of one case, one axial slice.

    Heat maps are drawn with the ``jet`` colour map over the grey image, the ground-truth tumor outlined
    in white. ``rows`` as in :func:`case_map_grid`.
    """
    return case_map_grid(rows, _draw_saliency, "saliency figure", title)


def plot_feature_maps(rows: Sequence[Mapping[str, object]], title: str | None = None) -> Figure:
    """Figure 8: per row the image, the ground truth and the feature maps of one case, on one axial slice.

    ``rows`` as in :func:`case_map_grid`, the maps being channel summaries in [0, 1].
    """
    return case_map_grid(rows, _draw_features, "feature-map figure", title)
