"""synth -> read -> preprocess: geometry, windowing, labels, cache reuse, inverse mapping, errors."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from aqcf.cli import main as aqcf_main
from aqcf.data.cache import Manifest, preprocess_cohort
from aqcf.data.cohorts import Case, read_atlas, read_lits
from aqcf.data.phantoms import ct_config, make_case, mri_config, synthesize
from aqcf.data.preprocess import PreprocessSettings, preprocess_image, restore_to_original
from aqcf.errors import AqcfError

CT_WINDOW = (-16.0, 176.0)
# Integral spacings: resampling to 1 mm repeats every voxel exactly (2 x 2 x 3 = 12 times).
SMALL = dict(shape=(32, 32, 16), spacing=(2.0, 2.0, 3.0))
PLANTED = {80: (14, 14, 7), 500: (8, 18, 5), -500: (20, 10, 10)}  # HU -> voxel corner in the stored array


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    synthesize(
        root / "phantoms", n_ct=3, n_mri=2, ct=ct_config(**SMALL), mri=mri_config(**SMALL), progress=False
    )
    # Plant 4x4x3-voxel blocks of known HU in CT case 0, inside the body.
    path = root / "phantoms" / "LiTS" / "volume-0.nii"
    image = nib.load(path)
    hu = np.asarray(image.dataobj).copy()
    for value, (i, j, k) in PLANTED.items():
        hu[i : i + 4, j : j + 4, k : k + 3] = value
    nib.save(nib.Nifti1Image(hu, image.affine, image.header), str(path))
    return root


def _world_to_voxel(affine, point):
    return np.linalg.solve(affine, np.append(point, 1.0))[:3]


@pytest.fixture(scope="module")
def ct_manifest(data):
    cases = read_lits(data / "phantoms" / "LiTS")
    return preprocess_cohort(cases, PreprocessSettings.default("ct"), data / "cache", progress=False)


@pytest.fixture(scope="module")
def mri_manifest(data):
    cases = read_atlas(data / "phantoms" / "ATLAS")
    return preprocess_cohort(cases, PreprocessSettings.default("mri"), data / "cache", progress=False)


def test_defaults_are_the_papers():
    ct, mri = PreprocessSettings.default("ct"), PreprocessSettings.default("mri")
    assert (ct.orientation, ct.window, ct.spacing, ct.pad_multiple) == ("RAS", CT_WINDOW, (1.0, 1.0, 1.0), 16)
    assert (mri.orientation, mri.window, mri.spacing) == ("LAS", (74.0, 511.0), (1.0, 1.0, 1.0))
    with pytest.raises(AqcfError, match="low < high"):
        PreprocessSettings.default("ct", window=(10, 5))
    with pytest.raises(AqcfError, match="orientation 'RRS'"):
        PreprocessSettings.default("ct", orientation="RRS")


def test_geometry_orientation_spacing_and_padding(ct_manifest, mri_manifest):
    for manifest, codes in ((ct_manifest, ("R", "A", "S")), (mri_manifest, ("L", "A", "S"))):
        for entry in manifest.entries:
            for key in ("image", "label"):
                img = nib.load(entry[key])
                assert nib.aff2axcodes(img.affine) == codes
                assert np.allclose(np.linalg.norm(img.affine[:3, :3], axis=0), 1.0)
                assert all(n % 16 == 0 for n in img.shape)
            values = np.asarray(nib.load(entry["image"]).dataobj)
            assert values.dtype == np.float32 and values.min() >= 0.0 and values.max() <= 1.0


def test_window_maps_planted_hu_values(ct_manifest):
    entry = ct_manifest.by_id()["lits-0"]
    source = nib.load(entry["source_image"])
    out = nib.load(entry["image"])
    values = np.asarray(out.dataobj)
    for hu, corner in PLANTED.items():
        # the block's centre voxel, far enough from its edges that linear interpolation sees only it
        centre_world = source.affine @ np.append(np.asarray(corner) + [1.5, 1.5, 1.0], 1.0)
        i, j, k = np.rint(_world_to_voxel(out.affine, centre_world[:3])).astype(int)
        expected = np.clip((hu - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0]), 0, 1)
        assert values[i, j, k] == pytest.approx(expected, abs=1e-5)
    assert (80 + 16) / 192 == pytest.approx(0.5)


def test_labels_preserved_and_every_labelled_voxel_kept(ct_manifest, mri_manifest):
    for entry in ct_manifest.entries + mri_manifest.entries:
        original = np.asarray(nib.load(entry["source_label"]).dataobj)
        processed = np.asarray(nib.load(entry["label"]).dataobj)
        assert set(np.unique(processed)) == set(np.unique(original))
        # 2 x 2 x 3 mm to 1 mm: each original voxel becomes exactly 12
        for value in (1, 2):
            assert (processed == value).sum() == 12 * (original == value).sum()
        assert entry["has_tumor"] == bool((original == 2).any())
        assert entry["voxel_counts"][1:] == [int((processed == 1).sum()), int((processed == 2).sum())]


def test_crop_comes_from_the_image_and_removes_air(ct_manifest):
    entry = ct_manifest.entries[1]
    original_extent = np.array(entry["original_shape"]) * np.array(entry["original_spacing"])
    assert np.prod(entry["preprocessed_shape"]) < 0.8 * np.prod(original_extent)
    assert entry["crop_extended_for_label"] is False
    tensor, record = preprocess_image(entry["source_image"], PreprocessSettings.default("ct"))
    assert record["crop_start"] == entry["crop_start"] and record["crop_stop"] == entry["crop_stop"]
    assert np.array_equal(tensor[0].numpy(), np.asarray(nib.load(entry["image"]).dataobj))


def test_restore_is_exact_with_integral_spacing_even_oblique_and_flipped(tmp_path):
    cfg = ct_config(shape=(24, 24, 12), spacing=(2.0, 2.0, 3.0), orientation="LPI", obliquity_deg=25.0)
    image, label, affine = make_case(cfg, np.random.default_rng(11))
    assert nib.aff2axcodes(affine) != ("R", "A", "S")
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "scan.nii.gz"))
    tensor, record = preprocess_image(tmp_path / "scan.nii.gz", PreprocessSettings.default("ct"))
    # Push the label through the same geometry: nearest-neighbour sample it at each preprocessed voxel.
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in tensor.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
    world = np.asarray(record["preprocessed_affine"]) @ np.c_[grid, np.ones(len(grid))].T
    source = np.rint(np.linalg.solve(affine, world)[:3].T).astype(int)
    inside = np.all((source >= 0) & (source < label.shape), axis=1)
    pushed = np.zeros(len(grid), np.uint8)
    pushed[inside] = label[tuple(source[inside].T)]
    restored = restore_to_original(pushed.reshape(tensor.shape[1:]), record)
    assert restored.shape == label.shape
    assert np.array_equal(restored, label)


def test_restore_agrees_with_non_integral_spacing(tmp_path, data):
    cfg = ct_config(shape=(30, 30, 14), spacing=(1.7, 1.3, 2.6), orientation="PLS")
    image, label, affine = make_case(cfg, np.random.default_rng(5))
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "volume-0.nii"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "segmentation-0.nii"))
    manifest = preprocess_cohort(
        read_lits(tmp_path), PreprocessSettings.default("ct"), tmp_path / "c", progress=False
    )
    entry = manifest.entries[0]
    restored = restore_to_original(np.asarray(nib.load(entry["label"]).dataobj), entry)
    assert (restored == label).mean() >= 0.99
    liver = label > 0
    assert 2 * (liver & (restored > 0)).sum() / (liver.sum() + (restored > 0).sum()) >= 0.97


def test_cache_reused_then_rebuilt_on_settings_or_case_change(data, ct_manifest):
    cases = read_lits(data / "phantoms" / "LiTS")
    stamps = {p: os.stat(p).st_mtime_ns for p in ct_manifest.folder.rglob("*") if p.is_file()}
    again = preprocess_cohort(cases, PreprocessSettings.default("ct"), data / "cache", progress=False)
    assert again.folder == ct_manifest.folder
    assert {p: os.stat(p).st_mtime_ns for p in again.folder.rglob("*") if p.is_file()} == stamps

    wider = preprocess_cohort(
        cases, PreprocessSettings.default("ct", window=(-100, 200)), data / "cache", progress=False
    )
    assert wider.folder != ct_manifest.folder
    fewer = preprocess_cohort(cases[:2], PreprocessSettings.default("ct"), data / "cache", progress=False)
    assert fewer.folder not in (ct_manifest.folder, wider.folder)
    assert json.loads((wider.folder / "manifest.json").read_text())["settings"]["window"] == [-100, 200]


def test_partial_cache_resumes_and_is_never_taken_as_complete(data, ct_manifest):
    cases = read_lits(data / "phantoms" / "LiTS")
    folder = data / "partial"
    shutil.copytree(ct_manifest.folder, folder / ct_manifest.folder.name)
    copy = folder / ct_manifest.folder.name
    (copy / "manifest.json").unlink()  # killed before the manifest was written ...
    (copy / "records" / "lits-2.json").unlink()  # ... and before case lits-2 was complete
    kept = os.stat(copy / "images" / "lits-0.nii").st_mtime_ns
    redone = os.stat(copy / "images" / "lits-2.nii").st_mtime_ns
    manifest = preprocess_cohort(cases, PreprocessSettings.default("ct"), folder, progress=False)
    assert manifest.folder == copy and manifest.ids == ["lits-0", "lits-1", "lits-2"]
    assert os.stat(copy / "images" / "lits-0.nii").st_mtime_ns == kept
    assert os.stat(copy / "images" / "lits-2.nii").st_mtime_ns != redone
    (copy / "labels" / "lits-1.nii").unlink()
    with pytest.raises(AqcfError, match=r"lits-1\.nii: listed in the cache but missing"):
        Manifest.load(copy)
    # preprocessing the cohort again finds the damage and rebuilds the case from its source
    again = preprocess_cohort(cases, PreprocessSettings.default("ct"), folder, progress=False)
    assert again.folder == copy and (copy / "labels" / "lits-1.nii").is_file()


def test_bad_cases_raise_errors_naming_the_file(tmp_path):
    image, label, affine = make_case(ct_config(**SMALL), np.random.default_rng(0))
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "volume-0.nii"))
    bad = label.copy()
    bad[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(bad, affine), str(tmp_path / "segmentation-0.nii"))
    with pytest.raises(AqcfError, match=r"segmentation-0\.nii: label values \{7\}"):
        preprocess_cohort(
            read_lits(tmp_path), PreprocessSettings.default("ct"), tmp_path / "c", progress=False
        )
    assert not list((tmp_path / "c").rglob("manifest.json"))
    air = np.full(image.shape, -1000, np.int16)
    nib.save(nib.Nifti1Image(air, affine), str(tmp_path / "air.nii"))
    with pytest.raises(AqcfError, match=r"air\.nii: no voxel above -16"):
        preprocess_image(tmp_path / "air.nii", PreprocessSettings.default("ct"))
    mri_case = Case("x", "mri", tmp_path / "air.nii", None)
    with pytest.raises(AqcfError, match="a mri case given to ct preprocessing"):
        preprocess_cohort([mri_case], PreprocessSettings.default("ct"), tmp_path / "c", progress=False)


def test_worker_processes_give_the_same_result(data, mri_manifest):
    cases = read_atlas(data / "phantoms" / "ATLAS")
    pooled = preprocess_cohort(
        cases, PreprocessSettings.default("mri"), data / "pool", workers=2, progress=False
    )
    for a, b in zip(pooled.entries, mri_manifest.entries, strict=True):
        assert a["id"] == b["id"] and a["preprocessed_affine"] == b["preprocessed_affine"]
        assert np.array_equal(
            np.asarray(nib.load(a["image"]).dataobj), np.asarray(nib.load(b["image"]).dataobj)
        )


def test_command_line(data, capsys):
    argv = [
        "preprocess",
        "--data",
        str(data / "phantoms" / "ATLAS"),
        "--format",
        "atlas",
        "--modality",
        "mri",
        "--cache",
        str(data / "cli"),
        "--spacing",
        "2",
        "2",
        "2",
        "--no-progress",
    ]
    assert aqcf_main(argv) == 0
    folder = capsys.readouterr().out.split(":")[0]
    manifest = Manifest.load(folder)
    assert manifest.settings.spacing == (2.0, 2.0, 2.0) and manifest.folder.name.startswith("mri-atlas-")
    assert np.allclose(nib.load(manifest.entries[0]["image"]).header.get_zooms(), 2.0)
    empty = data / "empty"
    empty.mkdir()
    argv = [
        "preprocess",
        "--data",
        str(empty),
        "--format",
        "lits",
        "--modality",
        "ct",
        "--cache",
        str(data / "cli"),
    ]
    assert aqcf_main(argv) == 2
    assert "no LiTS case found" in capsys.readouterr().err
