"""Figure 4: training and validation curves from Lightning ``CSVLogger`` files.

Every ``metrics.csv`` found under the given folders is one run (one fold); panel (a) the joint loss
(``train/loss``, ``val/loss``), panel (b) the mean Dice (``train/dice_mean``, ``val/dice_mean``), and
with ``per_class`` a panel (c) of ``val/dice_{ct,mri}_{liver,tumor}``. With several runs the line is
the mean over runs at each epoch and the band the spread: ± 1 SD (default, the paper reports mean ± SD
over folds) or min–max (``band="minmax"``).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from aqcf.errors import AqcfError
from aqcf.visualize.canvas import new_figure, save_figure

__all__ = [
    "LOSS_METRICS",
    "DICE_METRICS",
    "PER_CLASS_METRICS",
    "BANDS",
    "find_metrics_files",
    "read_metrics_csv",
    "aggregate_runs",
    "plot_curves",
]

LOSS_METRICS = ("train/loss", "val/loss")
DICE_METRICS = ("train/dice_mean", "val/dice_mean")
PER_CLASS_METRICS = ("val/dice_ct_liver", "val/dice_ct_tumor", "val/dice_mri_liver", "val/dice_mri_tumor")
BANDS = ("sd", "minmax")
METRICS_FILE = "metrics.csv"


def find_metrics_files(run_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Every ``metrics.csv`` below each folder (recursively), each file once, in path order.

    Raises:
        AqcfError: a folder does not exist or holds no ``metrics.csv``.
    """
    found: dict[Path, None] = {}
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise AqcfError(f"{run_dir}: no such folder")
        files = sorted(run_dir.rglob(METRICS_FILE))
        if not files:
            raise AqcfError(
                f"{run_dir}: no {METRICS_FILE} found under this folder "
                "(Lightning's CSVLogger writes <save_dir>/<name>/version_<n>/metrics.csv)"
            )
        for path in files:
            found.setdefault(path.resolve(), None)
    return list(found)


def read_metrics_csv(path: str | os.PathLike, metrics: Sequence[str]) -> dict[str, dict[int, float]]:
    """Per-epoch values of ``metrics`` from one ``CSVLogger`` file.

    Lightning writes one sparse row per logging step (train and validation metrics on different
    rows, empty cells elsewhere). A metric's column is its name, or ``NAME_epoch`` when it was logged
    with both ``on_step`` and ``on_epoch``. The value of an epoch is the mean of the column's
    non-empty cells in the rows of that epoch: the epoch value itself when logged once per epoch, the
    mean of the steps when logged per step.

    Args:
        path: a ``metrics.csv``.
        metrics: metric names to read; absent ones are left out of the result.

    Returns:
        metric -> {epoch: value}.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        if "epoch" not in header:
            raise AqcfError(f"{path}: no 'epoch' column; is this a Lightning CSVLogger metrics.csv?")
        columns = {}
        for metric in metrics:
            for column in (metric, f"{metric}_epoch"):
                if column in header:
                    columns[metric] = column
                    break
        sums: dict[str, dict[int, list[float]]] = {metric: {} for metric in columns}
        for line, row in enumerate(reader, start=2):
            epoch_text = (row.get("epoch") or "").strip()
            if not epoch_text:
                continue
            try:
                epoch = int(float(epoch_text))
            except ValueError:
                raise AqcfError(f"{path}:{line}: epoch {epoch_text!r} is not a number") from None
            for metric, column in columns.items():
                text = (row.get(column) or "").strip()
                if not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    raise AqcfError(f"{path}:{line}: {column} {text!r} is not a number") from None
                if math.isfinite(value):
                    sums[metric].setdefault(epoch, []).append(value)
    return {
        metric: {e: float(np.mean(v)) for e, v in sorted(by_epoch.items())}
        for metric, by_epoch in sums.items()
    }


def aggregate_runs(
    runs: Sequence[Mapping[int, float]], band: str = "sd"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean curve over runs and its band, epoch by epoch.

    At each epoch only the runs that reached it count (folds may stop at different epochs).

    Args:
        runs: one {epoch: value} per run.
        band: ``"sd"``: mean ± sample SD (ddof = 1); ``"minmax"``: the lowest and highest run.

    Returns:
        (epochs, mean, band low, band high); the band is NaN where fewer than two runs have a value.
    """
    if band not in BANDS:
        raise AqcfError(f"band {band!r} is not one of {BANDS}")
    epochs = np.asarray(sorted({e for run in runs for e in run}), dtype=int)
    mean, low, high = (np.full(epochs.shape, np.nan) for _ in range(3))
    for i, epoch in enumerate(epochs):
        values = np.asarray([run[epoch] for run in runs if epoch in run], dtype=np.float64)
        mean[i] = values.mean()
        if values.size >= 2:
            if band == "sd":
                sd = values.std(ddof=1)
                low[i], high[i] = mean[i] - sd, mean[i] + sd
            else:
                low[i], high[i] = values.min(), values.max()
    return epochs, mean, low, high


def plot_curves(
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    band: str = "sd",
    per_class: bool = False,
    title: str | None = None,
) -> Path:
    """Figure 4: (a) joint loss and (b) mean Dice per epoch, training and validation, mean over runs.

    Args:
        run_dirs: folders searched recursively for ``metrics.csv`` (one run each).
        out: destination ``.png`` (written atomically).
        band: spread over runs, ``"sd"`` or ``"minmax"`` (see :func:`aggregate_runs`).
        per_class: add panel (c) with the validation Dice per modality and class.
        title: optional figure title (default: the number of runs).

    Returns:
        The path written.
    """
    files = find_metrics_files(run_dirs)
    panels = [("(a) joint loss", LOSS_METRICS, "loss"), ("(b) mean Dice", DICE_METRICS, "Dice")]
    if per_class:
        panels.append(("(c) validation Dice per class", PER_CLASS_METRICS, "Dice"))
    wanted = [m for _, names, _ in panels for m in names]
    per_file = [read_metrics_csv(path, wanted) for path in files]
    if not any(any(by_epoch for by_epoch in metrics.values()) for metrics in per_file):
        names = ", ".join(str(f) for f in files)
        raise AqcfError(f"{names}: no values in any of the columns {', '.join(wanted)} (or NAME_epoch)")

    fig = new_figure((5.0 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_title, names, ylabel) in zip(axes, panels, strict=True):
        for name in names:
            runs = [metrics[name] for metrics in per_file if metrics.get(name)]
            if not runs:
                continue
            epochs, mean, low, high = aggregate_runs(runs, band)
            style = "--" if name.startswith("val/") else "-"
            (line,) = ax.plot(epochs, mean, style, label=f"{name} (n={len(runs)})")
            if np.isfinite(low).any():
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    spread = "± 1 SD" if band == "sd" else "min–max"
    fig.suptitle(title or f"mean over {len(files)} run(s); band: {spread}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)
