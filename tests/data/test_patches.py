"""Training patches read from the cache: label locations, label frequencies, exact crops, cache damage."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from aqcf.data.cache import Manifest, preprocess_cohort
from aqcf.data.cohorts import read_lits
from aqcf.data.patches import DrawPatches, class_locations, draw_patch, load_locations, patch_centres
from aqcf.data.phantoms import ct_config, make_case, synthesize
from aqcf.data.preprocess import PreprocessSettings
from aqcf.errors import AqcfError

SMALL = dict(shape=(32, 32, 16), spacing=(2.0, 2.0, 3.0))


def _label_map() -> np.ndarray:
    """40 x 30 x 20 background with a liver slab and a tumor cube, at known places."""
    label = np.zeros((40, 30, 20), np.uint8)
    label[5:35, 5:25, 4:16] = 1
    label[18:24, 12:18, 8:12] = 2
    return label


def test_locations_are_a_sample_of_each_label_without_repeats():
    label = _label_map()
    locations = class_locations(label, per_class=500, min_fraction=0.0, seed="case-1")
    counts = {k: int((label == k).sum()) for k in (0, 1, 2)}
    for k, coords in locations.items():
        assert coords.shape == (min(500, counts[k]), 3)
        assert (label[tuple(coords.T)] == k).all()
        assert len({tuple(c) for c in coords}) == len(coords)
    assert locations[2].shape[0] == 6 * 6 * 4  # fewer tumor voxels than asked: all of them
    again = class_locations(label, per_class=500, min_fraction=0.0, seed="case-1")
    assert all(np.array_equal(again[k], locations[k]) for k in locations)
    # the coverage floor: 1 % of 24,000 background voxels is more than 100
    floor = class_locations(label, per_class=100, min_fraction=0.01)
    assert floor[0].shape[0] == int(np.ceil(0.01 * counts[0]))
    assert class_locations(np.zeros((4, 4, 4), np.uint8))[2].shape == (0, 3)


@pytest.mark.parametrize(
    ("probabilities", "tumor", "expected"),
    [
        ({0: 0.2, 1: 0.4, 2: 0.4}, True, {0: 0.2, 1: 0.4, 2: 0.4}),
        ({0: 0.2, 1: 0.4, 2: 0.4}, False, {0: 1 / 3, 1: 2 / 3, 2: 0.0}),
        ({0: 0.0, 1: 0.0, 2: 1.0}, True, {0: 0.0, 1: 0.0, 2: 1.0}),
    ],
)
def test_centre_label_frequencies_are_the_configured_ones(probabilities, tumor, expected):
    label = _label_map()
    if not tumor:
        label[label == 2] = 1
    image = np.random.default_rng(0).random(label.shape, dtype=np.float32)
    patch = (16, 16, 8)
    centres = patch_centres(class_locations(label), label.shape, patch)
    draws = 3000
    generator = torch.Generator().manual_seed(0)
    seen = {0: 0, 1: 0, 2: 0}
    for _ in range(draws):
        out = draw_patch(image, label, centres, patch, probabilities, generator)
        centre = np.asarray(out["start"]) + np.asarray(patch) // 2
        value = int(label[tuple(centre)])
        assert value == out["centre_label"] == int(out["label"][0][tuple(np.asarray(patch) // 2)])
        seen[value] += 1
    for k, p in expected.items():
        sd = np.sqrt(p * (1 - p) / draws)
        assert abs(seen[k] / draws - p) <= 4 * sd + 1e-9, (k, seen)


def test_patch_larger_than_the_volume_is_zero_padded_symmetrically():
    label = np.zeros((10, 12, 6), np.uint8)
    label[4:6, 5:7, 2:4] = 2
    image = np.arange(label.size, dtype=np.float32).reshape(label.shape) + 1
    patch = (16, 12, 8)
    out = draw_patch(image, label, patch_centres(class_locations(label), label.shape, patch), patch, {2: 1.0})
    padded = np.pad(image, [(3, 3), (0, 0), (1, 1)])  # (16 - 10) // 2, 0, (8 - 6) // 2 zeros before
    start = np.asarray(out["start"]) + [3, 0, 1]
    expected = padded[start[0]:start[0] + 16, start[1]:start[1] + 12, start[2]:start[2] + 8]
    np.testing.assert_array_equal(out["image"][0].numpy(), expected)
    assert out["image"].shape == (1, 16, 12, 8) and out["label"].dtype == torch.uint8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    synthesize(root / "phantoms", n_ct=3, n_mri=0, ct=ct_config(**SMALL, n_tumors=(1, 2)), progress=False)
    cases = read_lits(root / "phantoms" / "LiTS")
    manifest = preprocess_cohort(cases, PreprocessSettings.default("ct"), root / "cache", progress=False)
    return root, cases, manifest


def test_patch_read_from_the_cache_equals_the_same_crop_of_the_nifti(cohort):
    import torchio as tio

    _, _, manifest = cohort
    entry = manifest.entries[0]
    subject = tio.Subject(
        image=tio.ScalarImage(entry["image"]), label=tio.LabelMap(entry["label"]), locations=entry["locations"]
    )
    patch = (24, 24, 16)
    subject = DrawPatches(patch, {0: 0.2, 1: 0.4, 2: 0.4}, samples=5)(subject)
    image = np.asarray(nib.load(entry["image"]).get_fdata(), dtype=np.float32)
    label = np.asarray(nib.load(entry["label"]).dataobj)
    assert len(subject["patches"]) == 5
    for out in subject["patches"]:
        crop = tuple(slice(s, s + p) for s, p in zip(out["start"], patch, strict=True))
        np.testing.assert_array_equal(out["image"][0].numpy(), image[crop])
        np.testing.assert_array_equal(out["label"][0].numpy(), label[crop])
    stored = load_locations(entry["locations"])
    assert all((label[tuple(c.T)] == k).all() for k, c in stored.items())


def test_manifest_records_size_and_checksum_of_every_cached_file(cohort):
    _, _, manifest = cohort
    for entry in manifest.entries:
        for key in ("image", "label", "locations"):
            assert entry["files"][key]["size"] == os.path.getsize(entry[key])


def test_damaged_cache_is_found_and_rebuilt(cohort, tmp_path, capsys):
    import shutil

    root, cases, manifest = cohort
    cache = tmp_path / "cache"
    shutil.copytree(manifest.folder, cache / manifest.folder.name)
    folder = cache / manifest.folder.name
    image = folder / "images" / "lits-1.nii"
    original = image.read_bytes()
    image.write_bytes(original[: len(original) // 2])  # truncated after preprocessing
    with pytest.raises(AqcfError, match=r"lits-1\.nii: \d+ bytes, \d+ when cached"):
        Manifest.load(folder)
    again = preprocess_cohort(cases, PreprocessSettings.default("ct"), cache, progress=False)
    assert again.folder == folder and image.read_bytes() == original
    assert "lits-1.nii" in capsys.readouterr().err

    # same size, other bytes: only the checksum finds it
    damaged = bytearray(original)
    damaged[-10] ^= 0xFF
    image.write_bytes(bytes(damaged))
    Manifest.load(folder, verify="size")
    with pytest.raises(AqcfError, match=r"lits-1\.nii: checksum differs"):
        Manifest.load(folder, verify="checksum")
    preprocess_cohort(cases, PreprocessSettings.default("ct"), cache, progress=False, verify="checksum")
    assert image.read_bytes() == original


def test_a_cache_without_recorded_checksums_is_not_trusted(cohort, tmp_path):
    import shutil

    _, cases, manifest = cohort
    folder = tmp_path / "cache" / manifest.folder.name
    shutil.copytree(manifest.folder, folder)
    for record in (folder / "records").glob("*.json"):
        entry = json.loads(record.read_text())
        entry.pop("files")
        record.write_text(json.dumps(entry))
    data = json.loads((folder / "manifest.json").read_text())
    for entry in data["cases"]:
        entry.pop("files")
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(AqcfError, match="no size or checksum recorded"):
        Manifest.load(folder)
    again = preprocess_cohort(cases, PreprocessSettings.default("ct"), tmp_path / "cache", progress=False)
    assert all("files" in e for e in again.entries)


def _broken_cohort(folder):
    """Five LiTS cases, three of them broken in three different ways."""
    config = ct_config(**SMALL)
    for n in range(5):
        image, label, affine = make_case(config, np.random.default_rng(n))
        if n == 1:
            label[0, 0, 0] = 7
        if n == 3:
            label[1, 1, 1] = 9
        if n == 4:
            image = np.full(image.shape, -1000, np.int16)  # air: no body to crop to
        nib.save(nib.Nifti1Image(image, affine), str(folder / f"volume-{n}.nii"))
        nib.save(nib.Nifti1Image(label, affine), str(folder / f"segmentation-{n}.nii"))
    return read_lits(folder)


def test_every_broken_case_of_a_cohort_is_named_and_no_manifest_is_written(tmp_path):
    (tmp_path / "LiTS").mkdir()
    cases = _broken_cohort(tmp_path / "LiTS")
    with pytest.raises(AqcfError) as info:
        preprocess_cohort(cases, PreprocessSettings.default("ct"), tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "3 of 5 cases" in message and "\n" not in message
    for name in ("segmentation-1.nii", "segmentation-3.nii", "volume-4.nii"):
        assert name in message
    assert not list((tmp_path / "cache").rglob("manifest.json"))

    manifest = preprocess_cohort(
        cases, PreprocessSettings.default("ct"), tmp_path / "cache", progress=False, skip_bad=True
    )
    assert manifest.ids == ["lits-0", "lits-2"]
    assert [s["id"] for s in manifest.skipped] == ["lits-1", "lits-3", "lits-4"]
    saved = json.loads((manifest.folder / "manifest.json").read_text())
    assert "segmentation-3.nii" in saved["skipped"][1]["problem"]
    # reused as is: the skipped cases are not retried
    assert preprocess_cohort(
        cases, PreprocessSettings.default("ct"), tmp_path / "cache", progress=False, skip_bad=True
    ).ids == manifest.ids


def test_label_probabilities_with_text_keys_as_read_back_from_json():
    label = _label_map()
    centres = patch_centres(class_locations(label), label.shape, (8, 8, 8))
    out = draw_patch(np.zeros(label.shape, np.float32), label, centres, (8, 8, 8), {"0": 0.0, "1": 0.0, "2": 1.0})
    assert out["centre_label"] == 2
