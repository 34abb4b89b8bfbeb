"""The paper's figures from run folders and NIfTI files: ``aqcf figures curves|qualitative``.

``aqcf figures curves RUN_DIR... --out fig.png``
    Figure 4: training and validation curves read from Lightning ``CSVLogger`` files
    (:func:`aqcf.visualize.curves.plot_curves`): every ``metrics.csv`` under the given folders is one
    run (one fold); ``--per-class`` adds the validation Dice per modality and class, ``--band minmax``
    draws the spread over runs as min–max instead of ± 1 SD.

``aqcf figures qualitative --image IMG --gt GT --pred NAME=PRED ... --out fig.png [--slices N]``
    Figures 5/6: several axial slices of one case, a column for the ground truth and one per
    prediction, liver red and tumor blue (:func:`aqcf.visualize.overlays.overlay_grid`), in radiological view.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from aqcf.errors import AqcfError, ArgumentParser
from aqcf.io import check_output, nifti_stem
from aqcf.visualize.canvas import save_figure
from aqcf.visualize.curves import BANDS, find_metrics_files, plot_curves
from aqcf.visualize.overlays import overlay_grid, pick_slices

__all__ = ["GT_COLUMN", "load_case", "plot_qualitative", "main"]

GT_COLUMN = "ground truth"


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
        n_slices: number of axial slices (see :func:`aqcf.visualize.overlays.pick_slices`).
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
        name = nifti_stem(text)
    if not name or not path:
        raise AqcfError(f"--pred {text!r}: expected NAME=PATH")
    return name, path


def _parser() -> ArgumentParser:
    """The verb's flags: one sub-command per figure."""
    parser = ArgumentParser(prog="aqcf figures", description="Draw the paper's figures as PNG files.")
    sub = parser.add_subparsers(dest="figure", required=True, metavar="{curves,qualitative}")
    _curves_flags(sub)
    _qualitative_flags(sub)
    return parser


def _curves_flags(sub) -> None:
    """``aqcf figures curves``: Figure 4."""
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


def _qualitative_flags(sub) -> None:
    """``aqcf figures qualitative``: Figures 5/6."""
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


def main(argv: list[str] | None = None) -> int:
    """``aqcf figures curves|qualitative ...``."""
    args = _parser().parse_args(argv)
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
