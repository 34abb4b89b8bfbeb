"""Grouped charts: bars with error bars (the report's Dice chart) and box plots (the gate values λ).

Both take plain numbers keyed by series and group, so the callers (:mod:`aqcf.evaluation.report`,
:mod:`aqcf.explain.gates`) decide what a series and a group are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from aqcf.visualize.canvas import new_figure

__all__ = ["BOX_COLOURS", "run_colors", "bar_chart", "box_chart"]

# colour-blind-safe (ColorBrewer Dark2), one per series of a box chart
BOX_COLOURS = ("#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")
LEGEND_COLUMNS = 4


def run_colors(n: int) -> list[tuple[float, ...]]:
    """One colour per run: Matplotlib's tab10 up to 10 runs, tab20 up to 20, then tab20 again."""
    palette = matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors
    return [tuple(palette[i % len(palette)]) for i in range(n)]


def bar_chart(
    groups: Sequence[str],
    bars: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
) -> Figure:
    """Bars side by side in each group, one colour per series (:func:`run_colors`), with error bars.

    Args:
        groups: the x tick labels, one group each.
        bars: series name -> (heights, error half-widths), one of each per group (NaN height: no bar).
        ylabel: y axis title.
        ylim: y axis range, or None for matplotlib's.

    Returns:
        A figure on an Agg canvas; the legend, up to four series a row, sits below the axes (bars may
        reach the top and bottom of the plot area).
    """
    names = list(bars)
    colors = run_colors(len(names))
    width = 0.8 / max(len(names), 1)
    legend_rows = math.ceil(len(names) / LEGEND_COLUMNS)
    fig = new_figure((1.8 + 1.6 * len(groups), 4.0 + 0.25 * legend_rows))
    ax = fig.subplots()
    for i, name in enumerate(names):
        heights, errors = bars[name]
        positions = np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width
        ax.bar(positions, heights, width, yerr=errors, capsize=2, label=name, color=colors[i])
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(list(groups))
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(names), LEGEND_COLUMNS),
              frameon=False)
    fig.tight_layout()
    return fig


def box_chart(
    series: Mapping[str, Mapping[int, Sequence[float]]],
    group_labels: Mapping[int, str],
    *,
    summarised: bool = False,
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
    title: str | None = None,
) -> Figure:
    """Box plots at integer group positions, one box per series side by side, one colour per series.

    Args:
        series: legend label -> {group position: values}, in legend order (colours :data:`BOX_COLOURS`).
            A series may leave groups out.
        group_labels: group position -> x tick label; every position of ``series`` needs one.
        summarised: the values are ``(q1, median, q3)`` instead of samples: boxes of the median and
            IQR without whiskers (the extremes are unknown); otherwise ordinary box plots (whiskers at
            1.5 IQR, outliers as points).
        ylabel: y axis title.
        ylim: y axis range, or None for matplotlib's.
        title: optional axes title.

    Returns:
        A figure on an Agg canvas.
    """
    groups = sorted(group_labels)
    width = 0.7 / len(series)
    fig = new_figure((1.4 * len(groups) + 2.5, 3.6))
    ax = fig.subplots()
    for i, (label, by_group) in enumerate(series.items()):
        present = [g for g in groups if g in by_group]
        if not present:
            continue
        offset = (i - (len(series) - 1) / 2) * width
        style = {
            "positions": [g + offset for g in present],
            "widths": width * 0.9,
            "patch_artist": True,
            "medianprops": {"color": "black"},
            "boxprops": {"facecolor": BOX_COLOURS[i % len(BOX_COLOURS)], "alpha": 0.8},
        }
        if summarised:
            stats = [_box_stats(*by_group[g]) for g in present]
            artists = ax.bxp(stats, showfliers=False, showcaps=False, **style)
        else:
            artists = ax.boxplot([np.asarray(by_group[g], dtype=np.float64) for g in present], **style)
        artists["boxes"][0].set_label(label)
    ax.set_xticks(groups)
    ax.set_xticklabels([group_labels[g] for g in groups])
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _box_stats(q1: float, median: float, q3: float) -> dict:
    """Matplotlib's ``bxp`` record of a box known only by its quartiles: whiskers at the box's ends."""
    return {"med": median, "q1": q1, "q3": q3, "whislo": q1, "whishi": q3, "fliers": []}
