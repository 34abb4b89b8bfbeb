"""The label vocabulary of aqcf.constants: the evaluated regions and the one label-value check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aqcf.constants import CLASS_NAMES, LABEL_VALUES, REGIONS, check_label_values, region_mask
from aqcf.errors import AqcfError


def test_the_table_liver_includes_tumor():
    assert CLASS_NAMES == ("background", "liver", "tumor") and LABEL_VALUES == (0, 1, 2)
    assert {name: set(values) for name, values in REGIONS.items()} == {"liver": {1, 2}, "tumor": {2}}


@pytest.mark.parametrize("as_tensor", [False, True])
def test_region_masks_of_numpy_arrays_and_tensors(as_tensor):
    label = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    given = torch.from_numpy(label) if as_tensor else label
    liver, tumor = region_mask(given, "liver"), region_mask(given, "tumor")
    assert np.asarray(liver).tolist() == [[False, True], [True, True]]
    assert np.asarray(tumor).tolist() == [[False, False], [True, True]]


@pytest.mark.parametrize(
    "array",
    [
        np.array([0, 2, 1, 2], dtype=np.uint8),
        np.array([0.0, 1.0, 2.0]),  # a float-stored mask of whole numbers
        np.array([True, False]),
        torch.tensor([[0, 2]]),
    ],
)
def test_valid_label_maps_pass_and_report_their_values(array):
    expected = sorted({int(v) for v in np.asarray(array).ravel().tolist()})
    assert check_label_values("mask.nii.gz", array).tolist() == expected


@pytest.mark.parametrize(
    ("array", "shown"),
    [
        (np.array([0, 3, 1]), "{3}"),
        (np.array([0.0, 0.5, np.nan]), "{0.5, nan}"),
        (np.array([-1, 0], dtype=np.int16), "{-1}"),
        (np.arange(10), "{3, 4, 5, 6, 7, ...}"),
    ],
)
def test_invalid_values_are_refused_naming_the_file_and_the_values(array, shown):
    with pytest.raises(AqcfError) as err:
        check_label_values("a/mask.nii.gz", array)
    assert str(err.value) == f"a/mask.nii.gz: label values {shown} outside {{0, 1, 2}}"
