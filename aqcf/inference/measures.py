"""Clinical measures of a liver / tumor label map in physical space: what a reader looks at first.

Measures, in physical units on the label map's own grid (the voxel volume is ``|det A|`` of the
affine's 3×3 part, in mm³, so oblique and anisotropic grids are measured correctly): the liver volume
(labels 1 and 2, mL), the tumor volume (label 2, mL), the tumor burden (%), the number of tumors
(connected components of label 2 under 26-connectivity) and each tumor's maximum 3D Feret diameter
and RECIST-style axial diameter (mm). The exact definition of every key: docs/inference.md,
*Clinical measures*.

The hull and the distances are computed here (scipy's ``ConvexHull`` and ``cdist``); labelling uses
``scipy.ndimage.label``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import cdist

from aqcf.constants import region_mask
from aqcf.errors import AqcfError

__all__ = [
    "CONNECTIVITY",
    "MM3_PER_ML",
    "voxel_volume_mm3",
    "axial_axis",
    "feret_diameter_mm",
    "axial_diameter_mm",
    "tumor_components",
    "scan_measures",
    "format_measures",
]

CONNECTIVITY = 26
MM3_PER_ML = 1000.0
_SPATIAL_NDIM = 3
# hull vertices compared per block in the all-pairs distance (bounds memory to block × n doubles)
_DISTANCE_BLOCK = 2048
_PERCENT = 100.0


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm³: ``|det|`` of the affine's 3×3 part (exact for oblique and sheared grids)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])))


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis (0, 1 or 2) whose direction is closest to the patient's head-foot (S-I) axis."""
    directions = np.asarray(affine, dtype=float)[:3, :3]
    cosines = np.abs(directions[2]) / np.linalg.norm(directions, axis=0)
    return int(np.argmax(cosines))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face-neighbour outside the mask: the only ones whose corners can be on the hull."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _corners(mask: np.ndarray) -> np.ndarray:
    """Distinct corners of the boundary voxels of ``mask`` (N, ndim), in voxel index coordinates.

    Voxel ``i`` covers ``[i - 0.5, i + 0.5]`` along each axis (its centre is at the index, as the affine
    assumes).
    """
    voxels = np.argwhere(_boundary(mask))
    offsets = np.array(list(itertools.product((-0.5, 0.5), repeat=mask.ndim)))
    corners = (voxels[:, None, :] + offsets[None]).reshape(-1, mask.ndim)
    return np.unique(corners, axis=0)


def _hull_vertices(points: np.ndarray) -> np.ndarray:
    """The points on the convex hull (an affine map keeps them the hull, so hull first, then map)."""
    if len(points) <= points.shape[1] + 1:
        return points
    return points[ConvexHull(points).vertices]


def _max_distance(points_mm: np.ndarray) -> float:
    """Largest distance between any two rows of ``points_mm`` (N, 3), in blocks to bound memory."""
    best = 0.0
    for start in range(0, len(points_mm), _DISTANCE_BLOCK):
        block = points_mm[start : start + _DISTANCE_BLOCK]
        best = max(best, float(cdist(block, points_mm).max()))
    return best


def _to_mm(points_index: np.ndarray, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=float)
    return points_index @ affine[:3, :3].T + affine[:3, 3]


def feret_diameter_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    """Maximum 3D Feret diameter of a binary mask in mm (0 for an empty mask).

    Args:
        mask: boolean (X, Y, Z) in the voxel grid of ``affine``.
        affine: 4×4 voxel-to-world affine in mm.

    Returns:
        The largest distance between two points of the union of the mask's voxels (boxes), in mm.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0.0
    return _max_distance(_to_mm(_hull_vertices(_corners(mask)), affine))


def axial_diameter_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    """Longest in-slice diameter of a binary mask in mm, over the slices along :func:`axial_axis`.

    Args:
        mask: boolean (X, Y, Z).
        affine: 4×4 voxel-to-world affine in mm.

    Returns:
        Over the slices of the acquired axial plane, the largest distance between two points of the mask's
        cross-section (pixels taken as the rectangles they cover), in mm; 0 for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    axis = axial_axis(affine)
    in_plane = [a for a in range(_SPATIAL_NDIM) if a != axis]
    best = 0.0
    for k in np.flatnonzero(mask.any(axis=tuple(in_plane))):
        section = np.take(mask, k, axis=axis)
        flat = _hull_vertices(_corners(section))
        # back to 3D index coordinates: the slice's centre plane
        points = np.empty((len(flat), _SPATIAL_NDIM))
        points[:, in_plane] = flat
        points[:, axis] = k
        best = max(best, _max_distance(_to_mm(points, affine)))
    return best


def tumor_components(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of label 2 under 26-connectivity: ``(component map, count)``.

    The map is int32 (X, Y, Z): 0 outside tumors, 1..count per tumor (``scipy.ndimage.label`` order).
    """
    structure = np.ones((3,) * _SPATIAL_NDIM, dtype=bool)
    components, count = ndimage.label(region_mask(np.asarray(labels), "tumor"), structure=structure)
    return components, int(count)


def scan_measures(labels: np.ndarray, affine: np.ndarray) -> dict:
    """Liver and tumor volumes, tumor count and diameters of one label map.

    Args:
        labels: (X, Y, Z) integer labels (0 background, 1 liver, 2 tumor) in the scan's own voxel grid.
        affine: the scan's 4×4 voxel-to-world (RAS, mm) affine.

    Returns:
        JSON-able dict: ``voxel_volume_mm3``, ``liver_volume_ml`` (labels 1 and 2), ``tumor_volume_ml``,
        ``tumor_burden_percent`` (None without liver), ``tumor_count``, ``largest_tumor_diameter_mm`` and
        ``largest_tumor_axial_diameter_mm`` (None without tumor), ``connectivity`` (26) and ``tumors``: one
        dict per tumor, largest volume first, with ``volume_ml``, ``diameter_mm``, ``axial_diameter_mm``,
        ``voxels`` and ``centroid_mm`` (world coordinates of the voxel centres' mean).
    """
    labels = np.asarray(labels)
    if labels.ndim != _SPATIAL_NDIM:
        raise AqcfError(f"label map of shape {labels.shape}: expected a 3-D volume")
    affine = np.asarray(affine, dtype=float)
    voxel_ml = voxel_volume_mm3(affine) / MM3_PER_ML
    liver_voxels = int(np.count_nonzero(region_mask(labels, "liver")))  # the liver with its tumors
    tumor_voxels = int(np.count_nonzero(region_mask(labels, "tumor")))
    components, count = tumor_components(labels)
    tumors = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        mask = components[box] == index
        # the crop's origin enters the affine, so distances and centroids stay in scan coordinates
        shift = np.eye(4)
        shift[:3, 3] = [s.start for s in box]
        local = affine @ shift
        voxels = int(mask.sum())
        tumors.append(
            {
                "volume_ml": voxels * voxel_ml,
                "diameter_mm": feret_diameter_mm(mask, local),
                "axial_diameter_mm": axial_diameter_mm(mask, local),
                "voxels": voxels,
                "centroid_mm": _to_mm(np.argwhere(mask).mean(axis=0), local).tolist(),
            }
        )
    tumors.sort(key=lambda t: -t["voxels"])
    liver_ml, tumor_ml = liver_voxels * voxel_ml, tumor_voxels * voxel_ml
    return {
        "voxel_volume_mm3": voxel_ml * MM3_PER_ML,
        "liver_volume_ml": liver_ml,
        "tumor_volume_ml": tumor_ml,
        "tumor_burden_percent": _PERCENT * tumor_ml / liver_ml if liver_voxels else None,
        "tumor_count": count,
        "largest_tumor_diameter_mm": max((t["diameter_mm"] for t in tumors), default=None),
        "largest_tumor_axial_diameter_mm": max((t["axial_diameter_mm"] for t in tumors), default=None),
        "connectivity": CONNECTIVITY,
        "tumors": tumors,
    }


def format_measures(measures: Mapping) -> str:
    """One line for the terminal, e.g. ``liver 1523.4 mL, tumor 12.0 mL (0.8%), 2 tumors, largest 31.2 mm``."""
    text = f"liver {measures['liver_volume_ml']:.1f} mL, tumor {measures['tumor_volume_ml']:.1f} mL"
    burden = measures.get("tumor_burden_percent")
    if burden is not None and not math.isnan(burden):
        text += f" ({burden:.1f}%)"
    count = measures["tumor_count"]
    if count == 0:
        return text + ", no tumor"
    text += f", {count} tumor{'s' if count != 1 else ''}, largest {measures['largest_tumor_diameter_mm']:.1f} mm"
    return text + f" (axial {measures['largest_tumor_axial_diameter_mm']:.1f} mm)"
