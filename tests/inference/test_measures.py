"""Clinical measures on hand-made label maps with known answers: volumes, tumor count, diameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aqcf.inference.measures import axial_axis, feret_diameter_mm, format_measures, scan_measures

SPACING = (0.8, 1.2, 2.5)  # anisotropic, mm


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    rotation = np.eye(3)
    rotation[a, a], rotation[a, b], rotation[b, a], rotation[b, b] = c, -s, s, c
    return rotation


def _affine(linear: np.ndarray, origin=(12.0, -40.0, 7.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


def _ball(shape, centre, radius_vox):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius_vox**2


def test_box_volume_and_diameters():
    labels = np.zeros((40, 30, 20), np.uint8)
    labels[5:35, 4:26, 2:18] = 1  # liver 30 x 22 x 16 voxels
    labels[10:20, 8:14, 5:9] = 2  # tumor box 10 x 6 x 4 voxels = 8 x 7.2 x 10 mm
    m = scan_measures(labels, _affine(np.diag(SPACING)))
    voxel = 0.8 * 1.2 * 2.5
    assert m["voxel_volume_mm3"] == pytest.approx(voxel)
    assert m["liver_volume_ml"] == pytest.approx(30 * 22 * 16 * voxel / 1000)  # tumor voxels included
    assert m["tumor_volume_ml"] == pytest.approx(10 * 6 * 4 * voxel / 1000)
    assert m["tumor_burden_percent"] == pytest.approx(100 * (10 * 6 * 4) / (30 * 22 * 16))
    assert m["tumor_count"] == 1 and m["connectivity"] == 26
    # the box's space diagonal; axially (z is head-foot) the diagonal of the 8 x 7.2 mm face
    assert m["largest_tumor_diameter_mm"] == pytest.approx(math.sqrt(8**2 + 7.2**2 + 10**2))
    assert m["largest_tumor_axial_diameter_mm"] == pytest.approx(math.hypot(8, 7.2))
    (tumor,) = m["tumors"]
    assert tumor["voxels"] == 240
    # centroid: voxel centres 10..19, 8..13, 5..8 -> 14.5, 10.5, 6.5 voxels from the origin
    assert tumor["centroid_mm"] == pytest.approx([12 + 14.5 * 0.8, -40 + 10.5 * 1.2, 7 + 6.5 * 2.5])


def test_diameters_do_not_depend_on_orientation():
    labels = np.zeros((24, 20, 16), np.uint8)
    labels[3:13, 4:10, 5:9] = 2
    expected_3d = math.sqrt(8**2 + 7.2**2 + 10**2)
    # oblique: rotated 30 degrees about the head-foot axis, then flipped left-right
    oblique = np.diag([-1.0, 1.0, 1.0]) @ _rotation(2, 30.0) @ np.diag(SPACING)
    m = scan_measures(labels, _affine(oblique))
    assert m["largest_tumor_diameter_mm"] == pytest.approx(expected_3d)
    assert m["largest_tumor_axial_diameter_mm"] == pytest.approx(math.hypot(8, 7.2))
    assert m["tumor_volume_ml"] == pytest.approx(240 * 0.8 * 1.2 * 2.5 / 1000)
    # axes stored as (z, x, y): the head-foot axis is voxel axis 0, so the axial plane is axes 1 and 2
    permuted = np.zeros((3, 3))
    permuted[2, 0], permuted[0, 1], permuted[1, 2] = 2.5, 0.8, 1.2
    labels_zxy = np.zeros((16, 24, 20), np.uint8)
    labels_zxy[5:9, 3:13, 4:10] = 2
    assert axial_axis(_affine(permuted)) == 0
    m = scan_measures(labels_zxy, _affine(permuted))
    assert m["largest_tumor_diameter_mm"] == pytest.approx(expected_3d)
    assert m["largest_tumor_axial_diameter_mm"] == pytest.approx(math.hypot(8, 7.2))


def test_two_balls_are_two_tumors_largest_first():
    labels = np.zeros((50, 40, 30), np.uint8)
    labels[_ball(labels.shape, (14, 20, 15), 8)] = 2
    labels[_ball(labels.shape, (38, 20, 15), 4)] = 2
    m = scan_measures(labels, _affine(np.eye(3)))
    assert m["tumor_count"] == 2
    big, small = m["tumors"]
    assert big["voxels"] == _ball(labels.shape, (14, 20, 15), 8).sum()
    assert small["voxels"] == _ball(labels.shape, (38, 20, 15), 4).sum()
    # a digital ball of radius r voxels spans 2r + 1 voxels along each axis: Feret >= 17 mm, < its box diagonal
    assert 17.0 <= big["diameter_mm"] <= 17.0 * math.sqrt(3)
    assert m["largest_tumor_diameter_mm"] == big["diameter_mm"]
    assert 9.0 <= small["diameter_mm"] < big["diameter_mm"]
    assert m["liver_volume_ml"] == pytest.approx((big["voxels"] + small["voxels"]) / 1000)


def test_corner_touching_voxels_are_one_tumor():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1, 1, 1] = labels[2, 2, 2] = 2  # share only a corner: one tumor under 26-connectivity
    labels[4, 4, 4] = 2
    m = scan_measures(labels, _affine(np.eye(3)))
    assert m["tumor_count"] == 2
    # the pair spans two voxels diagonally: from corner (0.5, 0.5, 0.5) to (2.5, 2.5, 2.5)
    assert m["largest_tumor_diameter_mm"] == pytest.approx(2 * math.sqrt(3))
    assert feret_diameter_mm(labels == 2, _affine(np.eye(3))) == pytest.approx(4 * math.sqrt(3))


def test_no_tumor_and_no_liver():
    empty = scan_measures(np.zeros((8, 8, 8), np.uint8), _affine(np.eye(3)))
    assert empty["liver_volume_ml"] == 0 and empty["tumor_count"] == 0 and empty["tumors"] == []
    assert empty["largest_tumor_diameter_mm"] is None and empty["tumor_burden_percent"] is None
    assert "no tumor" in format_measures(empty)
    line = format_measures(scan_measures(np.full((10, 10, 10), 2, np.uint8), _affine(np.eye(3))))
    assert line.startswith("liver 1.0 mL, tumor 1.0 mL (100.0%), 1 tumor, largest 17.3 mm")
