"""The paper's figures from run folders and NIfTI files: ``aqcf figures curves|qualitative``.

``aqcf figures curves RUN_DIR... --out fig.png``
    Figure 4: training and validation curves read from Lightning ``CSVLogger`` files. Every
    ``metrics.csv`` found under the given folders is one run (one fold); panel (a) the joint loss
    (``train/loss``, ``val/loss``), panel (b) the mean Dice (``train/dice_mean``, ``val/dice_mean``),
    and with ``--per-class`` a panel (c) of ``val/dice_{ct,mri}_{liver,tumor}``. With several runs
    the line is the mean over runs at each epoch and the band the spread: ± 1 SD (default, the paper
    reports mean ± SD over folds) or min–max (``--band minmax``).

``aqcf figures qualitative --image IMG --gt GT --pred NAME=PRED ... --out fig.png [--slices N]``
    Figures 5/6: several axial slices of one case, a column for the ground truth and one per
    prediction, liver red and tumor blue (:func:`aqcf.visualize.overlay_grid`), in radiological view.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from aqcf.errors import AqcfError
from aqcf.io import check_output
from aqcf.visualize import overlay_grid, pick_slices, save_figure

__all__ = [
    "LOSS_METRICS",
    "DICE_METRICS",
    "PER_CLASS_METRICS",
    "find_metrics_files",
    "read_metrics_csv",
    "aggregate_runs",
    "plot_curves",
    "load_case",
    "plot_qualitative",
    "main",
]

LOSS_METRICS = ("train/loss", "val/loss")
DICE_METRICS = ("train/dice_mean", "val/dice_mean")
PER_CLASS_METRICS = ("val/dice_ct_liver", "val/dice_ct_tumor", "val/dice_mri_liver", "val/dice_mri_tumor")
BANDS = ("sd", "minmax")
METRICS_FILE = "metrics.csv"
GT_COLUMN = "ground truth"


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

    fig = Figure(figsize=(5.0 * len(panels), 3.8))
    FigureCanvasAgg(fig)
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


def _read_volume(path: Path):
    import nibabel as nib  # imported on use: `aqcf figures curves` does not need it

    if not path.is_file():
        raise AqcfError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for unreadable files
        raise AqcfError(f"{path}: not a readable NIfTI file ({err})") from None
    return img


def _as_3d(img, path: Path) -> tuple[int, ...]:
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise AqcfError(f"{path}: expected a 3-D volume, got shape {tuple(img.shape)}")
    return shape


def load_case(
    image_path: str | os.PathLike, label_paths: Mapping[str, str | os.PathLike]
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[float, float, float]]:
    """Read an image and its label volumes, reoriented to RAS (nibabel's closest canonical).

    Args:
        image_path: NIfTI image.
        label_paths: column title -> NIfTI label volume (0/1/2), same grid as the image.

    Returns:
        (image (X, Y, Z) float32, {title: (X, Y, Z) int16}, voxel spacing in mm), all in RAS.

    Raises:
        AqcfError: a file is missing or unreadable, or its shape differs from the image's.
    """
    import nibabel as nib

    image_path = Path(image_path)
    img = _read_volume(image_path)
    shape = _as_3d(img, image_path)
    canonical = nib.as_closest_canonical(img)
    image = np.asarray(canonical.dataobj, dtype=np.float32).reshape(_as_3d(canonical, image_path))
    labels = {}
    for name, label_path in label_paths.items():
        label_path = Path(label_path)
        lab = _read_volume(label_path)
        label_shape = _as_3d(lab, label_path)
        if label_shape != shape:
            raise AqcfError(
                f"{label_path}: shape {label_shape} differs from the image {image_path} shape {shape}"
            )
        lab = nib.as_closest_canonical(lab)
        data = np.rint(np.asarray(lab.dataobj, dtype=np.float32)).astype(np.int16)
        labels[name] = data.reshape(image.shape)
    spacing = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    return image, labels, spacing


def plot_qualitative(
    image_path: str | os.PathLike,
    gt_path: str | os.PathLike,
    predictions: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    n_slices: int = 3,
    title: str | None = None,
    alpha: float = 0.4,
) -> Path:
    """Figures 5/6 for one case: rows = axial slices (chosen on the ground truth), columns = GT, predictions.

    Args:
        image_path: NIfTI image.
        gt_path: NIfTI ground truth (0/1/2).
        predictions: column title -> NIfTI prediction, e.g. ``{"A-QCF-Net": "pred/case.nii.gz"}``.
        out: destination ``.png`` (written atomically).
        n_slices: number of axial slices (see :func:`aqcf.visualize.pick_slices`).
        title: figure title (default: the image file name).
        alpha: opacity of the label colours.

    Returns:
        The path written.
    """
    if GT_COLUMN in predictions:
        raise AqcfError(f"prediction column name {GT_COLUMN!r} is taken by the ground truth")
    columns = {GT_COLUMN: gt_path, **predictions}
    image, labels, spacing = load_case(image_path, columns)
    slices = pick_slices(labels[GT_COLUMN], n_slices)
    fig = overlay_grid(
        image,
        labels,
        slices,
        alpha=alpha,
        orientation="RAS",
        title=title or Path(image_path).name,
        spacing=spacing,
    )
    return save_figure(fig, out)


def _parse_prediction(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep:  # a bare path: the column is named after the file
        path = text
        name = Path(text).name.removesuffix(".gz").removesuffix(".nii")
    if not name or not path:
        raise AqcfError(f"--pred {text!r}: expected NAME=PATH")
    return name, path


def main(argv: list[str] | None = None) -> int:
    """``aqcf figures curves|qualitative ...``."""
    from aqcf.errors import ArgumentParser

    parser = ArgumentParser(prog="aqcf figures", description="Draw the paper's figures as PNG files.")
    sub = parser.add_subparsers(dest="figure", required=True, metavar="{curves,qualitative}")

    curves = sub.add_parser(
        "curves",
        help="Figure 4: training/validation loss and Dice from Lightning CSVLogger metrics.csv files",
        description="Figure 4. Every metrics.csv under the given folders is one run (fold); the lines are "
        "the mean over runs per epoch, the band the spread over runs.",
    )
    curves.add_argument(
        "run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="folders holding metrics.csv"
    )
    curves.add_argument("--out", type=Path, required=True, help="output PNG")
    curves.add_argument(
        "--band", choices=BANDS, default="sd", help="spread over runs: ± 1 SD (default) or min–max"
    )
    curves.add_argument("--per-class", action="store_true", help="add a panel of validation Dice per class")
    curves.add_argument("--title", default=None)
    curves.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    quali = sub.add_parser(
        "qualitative",
        help="Figures 5/6: axial slices with ground truth and predictions (liver red, tumor blue)",
        description="Figures 5/6 for one case. Volumes are reoriented to RAS and shown in radiological view.",
    )
    quali.add_argument("--image", type=Path, required=True, help="NIfTI image")
    quali.add_argument("--gt", type=Path, required=True, help="NIfTI ground truth labels (0/1/2)")
    quali.add_argument(
        "--pred",
        action="append",
        default=[],
        metavar="NAME=PRED",
        help="a prediction and its column title; repeat",
    )
    quali.add_argument("--out", type=Path, required=True, help="output PNG")
    quali.add_argument("--slices", type=int, default=3, help="number of axial slices (rows)")
    quali.add_argument("--alpha", type=float, default=0.4, help="label opacity")
    quali.add_argument("--title", default=None)
    quali.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    args = parser.parse_args(argv)
    if args.figure == "curves":
        check_output(args.out, inputs=find_metrics_files(args.run_dirs), overwrite=args.overwrite)
        path = plot_curves(
            args.run_dirs, args.out, band=args.band, per_class=args.per_class, title=args.title
        )
    else:
        if args.slices < 1:
            raise AqcfError(f"--slices {args.slices}: must be at least 1")
        predictions = dict(_parse_prediction(p) for p in args.pred)
        if len(predictions) != len(args.pred):
            raise AqcfError("--pred: two predictions share a column name")
        check_output(args.out, inputs=[args.image, args.gt, *predictions.values()], overwrite=args.overwrite)
        path = plot_qualitative(
            args.image, args.gt, predictions, args.out, args.slices, args.title, args.alpha
        )
    print(f"wrote {path}")
    return 0
