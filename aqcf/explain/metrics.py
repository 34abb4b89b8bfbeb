"""How well a saliency map localises the tumor (section 4.3): Saliency-IoU, boundary-band coverage,
pointing game, and their summary over a test set.

Pure numpy/scipy functions of a saliency map (e.g. Grad-CAM++ for the tumor class, upsampled to the
image grid) and the ground-truth tumor mask, both (X, Y, Z) on the same grid, with the voxel spacing in
mm. No library ships these localisation scores for 3-D masks with anisotropic voxels, hence by hand.

The paper does not state the rules (binarisation for the IoU, the boundary band in mm on either side
of the tumor boundary, the pointing game's peak and tolerance); they are chosen here, and each default
and why it was chosen is in docs/explain.md, *Saliency localisation*.

A case without tumor has no localisation target: the single-metric functions raise
:class:`AqcfError` for an empty mask, and :func:`saliency_metrics` returns NaN for it, which
:func:`summarise_saliency` leaves out of the means (and counts).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from aqcf.errors import AqcfError

__all__ = [
    "BINARISATION_RULES",
    "BAND_MODES",
    "METRIC_NAMES",
    "binarise_saliency",
    "saliency_iou",
    "boundary_band",
    "boundary_band_coverage",
    "pointing_game",
    "saliency_metrics",
    "summarise_saliency",
]

BINARISATION_RULES = ("topk", "fraction", "quantile")
BAND_MODES = ("mass", "coverage")
METRIC_NAMES = ("saliency_iou", "band_coverage", "pointing_game")


def _check(saliency: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    saliency = np.asarray(saliency, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if saliency.shape != mask.shape or saliency.ndim != 3:
        raise AqcfError(
            f"saliency {saliency.shape} and tumor mask {mask.shape} must be equal 3-D (X, Y, Z) shapes"
        )
    if not np.all(np.isfinite(saliency)) or saliency.min() < 0:
        raise AqcfError("saliency map must be finite and >= 0 (apply the ReLU of Grad-CAM before scoring)")
    if not mask.any():
        raise AqcfError("tumor mask is empty: saliency localisation is undefined for a case without tumor")
    return saliency, mask


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or any(not s > 0 for s in spacing):
        raise AqcfError(f"voxel spacing {spacing} must be {ndim} positive values in mm")
    return spacing


def binarise_saliency(
    saliency: np.ndarray,
    rule: str = "topk",
    k: int | None = None,
    threshold: float = 0.5,
    quantile: float = 0.95,
) -> np.ndarray:
    """Turn a saliency map into a salient-voxel mask.

    Args:
        saliency: (X, Y, Z) float >= 0.
        rule: ``"topk"``: the ``k`` most salient voxels (every voxel tied with the k-th value is kept,
            so the result is deterministic and a map equal to a mask reproduces that mask);
            ``"fraction"``: voxels ``>= threshold * max``; ``"quantile"``: voxels ``>=`` the
            ``quantile`` of the map. An all-zero map has no salient voxel under any rule.
        k: number of voxels for ``"topk"`` (required there).
        threshold: fraction of the maximum for ``"fraction"``, in (0, 1].
        quantile: quantile in (0, 1) for ``"quantile"``.

    Returns:
        (X, Y, Z) bool.
    """
    saliency = np.asarray(saliency, dtype=np.float64)
    peak = saliency.max(initial=0.0)
    if peak <= 0:
        return np.zeros(saliency.shape, dtype=bool)
    if rule == "topk":
        if k is None or k < 1:
            raise AqcfError(f"binarisation 'topk' needs k >= 1, got {k}")
        k = min(int(k), saliency.size)
        kth = np.partition(saliency.ravel(), saliency.size - k)[saliency.size - k]
        cut = kth
    elif rule == "fraction":
        if not 0 < threshold <= 1:
            raise AqcfError(f"binarisation 'fraction' needs a threshold in (0, 1], got {threshold}")
        cut = threshold * peak
    elif rule == "quantile":
        if not 0 < quantile < 1:
            raise AqcfError(f"binarisation 'quantile' needs a quantile in (0, 1), got {quantile}")
        cut = np.quantile(saliency, quantile)
    else:
        raise AqcfError(f"binarisation rule {rule!r} is not one of {BINARISATION_RULES}")
    # a zero-valued voxel is never salient, even when the cut falls to zero
    return (saliency >= cut) & (saliency > 0)


def saliency_iou(
    saliency: np.ndarray,
    mask: np.ndarray,
    rule: str = "topk",
    threshold: float = 0.5,
    quantile: float = 0.95,
) -> float:
    """Saliency-IoU: intersection over union of the binarised saliency and the tumor mask.

    The default rule ``"topk"`` keeps as many voxels as the tumor has: it needs no threshold, does
    not depend on how the map is scaled (Grad-CAM maps are upsampled from coarse stages and
    normalised differently across methods and cases), and IoU = 1 exactly when the tumor voxels are
    the most salient ones. See :func:`binarise_saliency` for the other rules.

    Args:
        saliency: (X, Y, Z) float >= 0.
        mask: (X, Y, Z) bool tumor mask, not empty.
        rule: ``"topk"`` (default), ``"fraction"`` or ``"quantile"``.
        threshold: for ``"fraction"``.
        quantile: for ``"quantile"``.

    Returns:
        IoU in [0, 1].
    """
    saliency, mask = _check(saliency, mask)
    salient = binarise_saliency(saliency, rule, k=int(mask.sum()), threshold=threshold, quantile=quantile)
    union = np.logical_or(salient, mask).sum()
    return float(np.logical_and(salient, mask).sum() / union)


def boundary_band(mask: np.ndarray, spacing: Sequence[float], band_mm: float = 3.0) -> np.ndarray:
    """Voxels within ``band_mm`` of the tumor boundary, on both sides, distances in mm.

    A tumor voxel is in the band when the distance from its centre to the nearest non-tumor voxel
    centre is ``<= band_mm``; a non-tumor voxel when its distance to the nearest tumor voxel centre is
    ``<= band_mm`` (Euclidean distance transforms with the voxel spacing as sampling). With 1 mm
    voxels and 3 mm, that is three voxel layers inside and three outside.

    Args:
        mask: (X, Y, Z) bool tumor mask.
        spacing: voxel size (sx, sy, sz) in mm.
        band_mm: half-width of the band in mm.

    Returns:
        (X, Y, Z) bool band.
    """
    mask = np.asarray(mask).astype(bool)
    spacing = _spacing(spacing, mask.ndim)
    if not band_mm > 0:
        raise AqcfError(f"boundary band width {band_mm} mm must be positive")
    if not mask.any() or mask.all():
        return np.zeros(mask.shape, dtype=bool)
    depth_inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    distance_outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return np.where(mask, depth_inside <= band_mm, distance_outside <= band_mm)


def boundary_band_coverage(
    saliency: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    band_mm: float = 3.0,
    mode: str = "mass",
    rule: str = "topk",
    threshold: float = 0.5,
    quantile: float = 0.95,
) -> float:
    """How much of the saliency sits on the tumor boundary (a ``±band_mm`` band, see :func:`boundary_band`).

    Args:
        saliency: (X, Y, Z) float >= 0.
        mask: (X, Y, Z) bool tumor mask, not empty.
        spacing: voxel size (sx, sy, sz) in mm.
        band_mm: half-width of the band in mm (the paper's 3 mm).
        mode: ``"mass"`` (default): the fraction of the total saliency mass that falls inside the band,
            ``sum(saliency[band]) / sum(saliency)``; it needs no threshold. ``"coverage"``: the
            fraction of band voxels that are salient after binarisation with ``rule``
            (``|salient ∩ band| / |band|``), the literal reading of "covered X% of the band".
        rule, threshold, quantile: binarisation for ``"coverage"``, see :func:`binarise_saliency`
            (``"topk"`` with k = tumor volume).

    Returns:
        A fraction in [0, 1]; 0 for an all-zero map.
    """
    saliency, mask = _check(saliency, mask)
    band = boundary_band(mask, spacing, band_mm)
    if mode == "mass":
        total = saliency.sum()
        return float(saliency[band].sum() / total) if total > 0 else 0.0
    if mode == "coverage":
        salient = binarise_saliency(saliency, rule, k=int(mask.sum()), threshold=threshold, quantile=quantile)
        return float(np.logical_and(salient, band).sum() / band.sum())
    raise AqcfError(f"band coverage mode {mode!r} is not one of {BAND_MODES}")


def pointing_game(
    saliency: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float] | None = None,
    tolerance_mm: float = 0.0,
) -> bool:
    """Pointing game: does the saliency peak fall inside the tumor?

    The peak is the first voxel in C order that attains the maximum (``np.argmax``); an all-zero map
    points nowhere and scores False. With ``tolerance_mm > 0`` a peak within that distance (in mm,
    from voxel centre to the nearest tumor voxel centre) also counts, as in Zhang et al.'s
    original pointing game, which allows 15 pixels.

    Args:
        saliency: (X, Y, Z) float >= 0.
        mask: (X, Y, Z) bool tumor mask, not empty.
        spacing: voxel size in mm; needed only with a tolerance.
        tolerance_mm: distance tolerance in mm (default 0: strictly inside).

    Returns:
        True for a hit.
    """
    saliency, mask = _check(saliency, mask)
    if saliency.max() <= 0:
        return False
    peak = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    if mask[peak]:
        return True
    if tolerance_mm <= 0:
        return False
    if spacing is None:
        raise AqcfError("pointing game with a tolerance in mm needs the voxel spacing")
    distance = ndimage.distance_transform_edt(~mask, sampling=_spacing(spacing, mask.ndim))
    return bool(distance[peak] <= tolerance_mm)


def saliency_metrics(
    saliency: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    band_mm: float = 3.0,
    rule: str = "topk",
    band_mode: str = "mass",
    tolerance_mm: float = 0.0,
) -> dict[str, float]:
    """All three localisation scores of one case, NaN when the case has no tumor.

    Args:
        saliency: (X, Y, Z) float >= 0.
        mask: (X, Y, Z) bool tumor mask (may be empty).
        spacing: voxel size in mm.
        band_mm, rule, band_mode, tolerance_mm: see the single-metric functions.

    Returns:
        ``{"saliency_iou": float, "band_coverage": float, "pointing_game": 1.0 | 0.0}``.
    """
    if not np.asarray(mask).any():
        return dict.fromkeys(METRIC_NAMES, math.nan)
    return {
        "saliency_iou": saliency_iou(saliency, mask, rule=rule),
        "band_coverage": boundary_band_coverage(saliency, mask, spacing, band_mm, mode=band_mode, rule=rule),
        "pointing_game": float(pointing_game(saliency, mask, spacing, tolerance_mm)),
    }


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if values.size == 0:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    sd = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return {"mean": float(values.mean()), "sd": sd, "n": int(values.size)}


def summarise_saliency(
    rows: Iterable[Mapping[str, object]],
    metrics: Sequence[str] = METRIC_NAMES,
    across: str = "cases",
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean ± SD of each metric per modality and over all cases.

    Args:
        rows: one mapping per case with a ``"modality"`` key and a value per metric (booleans of the
            pointing game count as 1/0; NaN, i.e. a case without tumor, is left out). With
            ``across="folds"`` each row also needs a ``"fold"`` key.
        metrics: the metric keys to summarise.
        across: ``"cases"``: mean and sample SD (ddof = 1) over cases; ``"folds"``: first the mean per
            fold, then mean and SD over the fold means, as the paper reports its tables.

    Returns:
        ``{group: {metric: {"mean", "sd", "n"}}}`` with groups the modalities (sorted) and ``"all"``;
        ``n`` counts cases (or folds) with a value; SD is NaN when ``n < 2``.
    """
    if across not in ("cases", "folds"):
        raise AqcfError(f"summarise_saliency: across={across!r} is neither 'cases' nor 'folds'")
    rows = list(rows)
    for i, row in enumerate(rows):
        missing = [
            key for key in ("modality", *metrics, *(("fold",) if across == "folds" else ())) if key not in row
        ]
        if missing:
            raise AqcfError(f"saliency row {i}: missing {', '.join(missing)}")
    groups = {"all": rows}
    for modality in sorted({str(row["modality"]) for row in rows}):
        groups[modality] = [row for row in rows if str(row["modality"]) == modality]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for group, members in groups.items():
        summary[group] = {}
        for metric in metrics:
            if across == "cases":
                values = [float(row[metric]) for row in members]
            else:
                per_fold: dict[object, list[float]] = {}
                for row in members:
                    per_fold.setdefault(row["fold"], []).append(float(row[metric]))
                values = [_mean_sd(v)["mean"] for v in per_fold.values()]
            summary[group][metric] = _mean_sd(values)
    return summary
