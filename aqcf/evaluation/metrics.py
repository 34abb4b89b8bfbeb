"""Per-case segmentation metrics (Dice, HD95, MSD) and their summary over cases.

Pure functions on arrays: no files. :func:`evaluate_case` turns one predicted and one reference label
map (0 background, 1 liver, 2 tumor) into one row per class; :func:`summarise` turns the rows of many
cases into per-modality, per-class statistics. ``aqcf evaluate`` and ``aqcf test``'s results writer
(:class:`aqcf.evaluation.test_results.TestResultsWriter`) both call these two and write the same files
(:mod:`aqcf.evaluation.evaluate`).

Conventions:

* **Classes.** ``liver`` is the whole liver including tumor (label 1 or 2, the LiTS convention);
  ``tumor`` is label 2 (:data:`aqcf.constants.REGIONS`).
* **Metrics.** Dice (a fraction), HD95 and MSD (mm, with the reference's voxel spacing), from MONAI.
* **Empty masks.** Where exactly one mask is empty the distances are undefined: NaN
  (``empty_distance="nan"``, the default, counted as ``n_undefined`` in the summary) or the image
  diagonal in mm (``empty_distance="diagonal"``).
* **Pooled Dice.** Each row carries the voxel counts of prediction, reference and their intersection,
  from which the summary gives the pooled Dice over cases beside the per-case mean.

The surface and percentile definitions, the empty-mask table and why both Dice summaries are
reported: docs/evaluation.md, *Metrics*, *Empty masks* and *Per-case mean and pooled Dice*.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

from aqcf.constants import REGIONS, check_label_values, check_name
from aqcf.errors import AqcfError

__all__ = [
    "METRICS",
    "ROW_FIELDS",
    "EMPTY_DISTANCE_RULES",
    "binary_metrics",
    "evaluate_case",
    "summarise",
]

METRICS = ("dice", "hd95", "msd")
ROW_FIELDS = ("case", "modality", "class", *METRICS, "pred_voxels", "ref_voxels", "intersection")
EMPTY_DISTANCE_RULES = ("nan", "diagonal")
HD_PERCENTILE = 95


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the box around the True voxels of ``mask`` grown by ``margin`` (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def binary_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    *,
    empty_distance: str = "nan",
) -> dict[str, float | int]:
    """Dice, HD95 and MSD of one binary prediction against one binary reference.

    Args:
        pred: boolean mask, shape (X, Y, Z) (any number of spatial axes).
        ref: boolean mask of the same shape.
        spacing: voxel size in mm along each axis of the arrays, e.g. the reference's
            ``header.get_zooms()[:3]``.
        empty_distance: value of HD95 and MSD when exactly one mask is empty: ``"nan"`` (undefined) or
            ``"diagonal"`` (the image diagonal, ``sqrt(sum((shape_i * spacing_i)^2))`` mm).

    Returns:
        ``{"dice", "hd95" (mm), "msd" (mm), "pred_voxels", "ref_voxels", "intersection"}``. Both masks
        empty: Dice 1, HD95 0, MSD 0. Exactly one empty: Dice 0, distances per ``empty_distance``.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise AqcfError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != ref.ndim:
        raise AqcfError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {ref.ndim}-D mask")
    if empty_distance not in EMPTY_DISTANCE_RULES:
        raise AqcfError(f"empty_distance {empty_distance!r} is not one of {EMPTY_DISTANCE_RULES}")
    spacing = tuple(float(s) for s in spacing)

    pred_voxels, ref_voxels = int(pred.sum()), int(ref.sum())
    intersection = int(np.logical_and(pred, ref).sum())
    counts = {"pred_voxels": pred_voxels, "ref_voxels": ref_voxels, "intersection": intersection}
    if pred_voxels == 0 and ref_voxels == 0:
        return {"dice": 1.0, "hd95": 0.0, "msd": 0.0, **counts}
    if pred_voxels == 0 or ref_voxels == 0:
        if empty_distance == "diagonal":
            distance = math.sqrt(sum((n * s) ** 2 for n, s in zip(ref.shape, spacing, strict=True)))
        else:
            distance = math.nan
        return {"dice": 0.0, "hd95": distance, "msd": distance, **counts}

    # the metrics only look at the union of both masks (plus a one-voxel rim so that surfaces on the
    # crop border stay surfaces): cropping keeps whole CT volumes out of float tensors
    box = _bounding_box(pred | ref)
    y_pred = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(ref[box]))[None, None]
    dice = compute_dice(y_pred.float(), y.float(), include_background=True, ignore_empty=False)
    with warnings.catch_warnings():
        # MONAI warns about empty masks (impossible here) and about its own deprecated internals
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=HD_PERCENTILE, spacing=spacing
        )
        msd = compute_average_surface_distance(
            y_pred, y, include_background=True, symmetric=True, spacing=spacing
        )
    return {"dice": float(dice.item()), "hd95": float(hd95.item()), "msd": float(msd.item()), **counts}


def evaluate_case(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    case: str = "",
    modality: str = "",
    classes: Mapping[str, Sequence[int]] = REGIONS,
    empty_distance: str = "nan",
) -> list[dict]:
    """Metrics of one case, one row per class.

    Args:
        pred: predicted label map, shape (X, Y, Z), values in {0, 1, 2}.
        ref: reference label map, same shape and values.
        spacing: reference voxel size in mm along the array axes (X, Y, Z).
        case: case id written into each row.
        modality: ``"ct"`` or ``"mri"`` written into each row (:func:`summarise` groups by it).
        classes: class name -> label values forming the class; default liver = {1, 2}, tumor = {2}.
        empty_distance: see :func:`binary_metrics`.

    Returns:
        One dict per class with the keys of :data:`ROW_FIELDS`: ``case``, ``modality``, ``class``,
        ``dice``, ``hd95`` (mm), ``msd`` (mm), ``pred_voxels``, ``ref_voxels``, ``intersection``.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise AqcfError(
            f"case {case!r}: prediction shape {pred.shape} differs from reference shape {ref.shape}"
        )
    check_label_values(f"case {case!r} prediction", pred)
    check_label_values(f"case {case!r} reference", ref)
    rows = []
    for name, values in classes.items():
        result = binary_metrics(
            np.isin(pred, values), np.isin(ref, values), spacing, empty_distance=empty_distance
        )
        rows.append({"case": case, "modality": modality, "class": name, **result})
    return rows


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample SD (ddof 1), median and count of the finite values; NaNs counted as undefined."""
    arr = np.asarray(values, dtype=float)
    finite = arr[np.isfinite(arr)]
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else None,
        "std": float(finite.std(ddof=1)) if n > 1 else None,
        "median": float(np.median(finite)) if n else None,
        "n": n,
        "n_undefined": int(arr.size - n),
    }


def summarise(rows: Iterable[Mapping]) -> dict:
    """Statistics over cases, per modality and class.

    Args:
        rows: rows as returned by :func:`evaluate_case` (each needs ``modality`` ``"ct"``/``"mri"``).

    Returns:
        ``{"per_modality": {modality: {class: {...}}}, "n_cases": {modality: int}, ...}``; for each
        modality and class: ``dice``, ``hd95``, ``msd`` each ``{"mean", "std", "median", "n",
        "n_undefined"}`` (``std`` is the sample SD, ddof 1; ``None`` where undefined; ``n`` counts the
        finite values, ``n_undefined`` the NaN distances of one-sided empty cases), ``pooled_dice``
        (``2·Σ intersection / (Σ pred + Σ ref)``; 1 when both sums are 0), ``n_cases`` and
        ``n_ref_empty`` (cases whose reference lacks the class, e.g. tumor-free cases).
    """
    grouped: dict[str, dict[str, list[Mapping]]] = {}
    for row in rows:
        modality = check_name(row["modality"])
        grouped.setdefault(modality, {}).setdefault(str(row["class"]), []).append(row)

    per_modality: dict[str, dict] = {}
    n_cases: dict[str, int] = {}
    for modality in sorted(grouped):
        per_modality[modality] = {}
        cases: set[str] = set()
        for name, class_rows in grouped[modality].items():
            cases.update(str(r["case"]) for r in class_rows)
            entry: dict = {metric: _stats([float(r[metric]) for r in class_rows]) for metric in METRICS}
            inter = sum(int(r["intersection"]) for r in class_rows)
            total = sum(int(r["pred_voxels"]) + int(r["ref_voxels"]) for r in class_rows)
            entry["pooled_dice"] = 2.0 * inter / total if total else 1.0
            entry["n_cases"] = len(class_rows)
            entry["n_ref_empty"] = sum(int(r["ref_voxels"]) == 0 for r in class_rows)
            per_modality[modality][name] = entry
        n_cases[modality] = len(cases)
    return {
        "metrics": list(METRICS),
        "units": {"dice": "fraction", "hd95": "mm", "msd": "mm"},
        "n_cases": n_cases,
        "per_modality": per_modality,
    }
