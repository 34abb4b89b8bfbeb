"""aqcf.constants: the label vocabulary (regions, the one label-value check) and the stream-name checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aqcf.constants import (
    CLASS_NAMES,
    LABEL_VALUES,
    REGIONS,
    check_label_values,
    check_modality,
    check_name,
    check_stream,
    region_mask,
)
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


def test_stream_names_are_identifiers_of_any_case():
    assert check_name("T2") == "t2" and check_name("pet") == "pet"
    for bad in ("t-2", "", "2t", "ct mri"):
        with pytest.raises(AqcfError, match="is not a name"):
            check_name(bad)


def test_modality_check_accepts_only_the_names_it_is_given():
    assert check_modality("CT") == "ct" and check_modality("mri") == "mri"
    with pytest.raises(AqcfError, match="'t2' is neither 'ct' nor 'mri'"):
        check_modality("t2")
    assert check_modality("T2", ("ct", "mri", "t2")) == "t2"
    with pytest.raises(AqcfError, match="'pet' is none of ct, t2"):
        check_modality("pet", ("ct", "t2"))


def test_a_networks_streams_are_its_modalities_and_ct_mri_without_them():
    from aqcf.networks.aqcfnet import AQCFNet

    three = AQCFNet(widths=(2, 4, 8, 8), modalities=("ct", "mri", "t2"))
    assert check_stream("T2", three) == "t2"
    with pytest.raises(AqcfError, match="'pet' is none of ct, mri, t2"):
        check_stream("pet", three)
    assert check_stream("mri", torch.nn.Identity()) == "mri"
    with pytest.raises(AqcfError, match="neither 'ct' nor 'mri'"):
        check_stream("t2", torch.nn.Identity())
