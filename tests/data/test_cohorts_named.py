"""Named cohorts end to end: ``data.cohorts``, one queue per cohort, M streams, ``aqcf segment --modality t2``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from aqcf.cli import main
from aqcf.data.datamodule import UnpairedDataModule
from aqcf.data.preprocess import PreprocessSettings
from tests.conftest import REPO, TINY_CONFIG

THREE = REPO / "configs" / "three_cohorts.yaml"
SMALL = dict(patch_size=(32, 32, 16), samples_per_volume=2, queue_length=4, num_workers=0, progress=False,
             augment=False, batch_pairs=2)


@pytest.fixture(scope="session")
def t2_cohort(tmp_path_factory) -> Path:
    """Six T2 phantoms (nnU-Net layout) of 48x48x24 voxels, written by ``aqcf synth --n-t2``."""
    out = tmp_path_factory.mktemp("t2")
    assert main(["synth", "--out", str(out), "--n-ct", "0", "--n-mri", "0", "--n-t2", "6", "--shape", "48", "48", "24",
                 "--seed", "3", "--overwrite"]) == 0
    return out / "T2"


def _cohorts(phantoms: Path, t2: Path) -> list[dict]:
    return [
        {"name": "ct", "root": str(phantoms / "LiTS"), "format": "lits"},
        {"name": "mri", "root": str(phantoms / "ATLAS"), "format": "atlas"},
        {"name": "t2", "root": str(t2), "format": "nnunet", "window": [60.0, 420.0]},
    ]


def _fit_args(phantoms: Path, t2: Path, root: Path) -> list[str]:
    layer = root / "cohorts.yaml"
    layer.write_text(yaml.safe_dump({"data": {"cohorts": _cohorts(phantoms, t2)}}))
    return ["--config", str(THREE), "--config", str(TINY_CONFIG), "--config", str(layer),
            "--data.cache_dir", str(phantoms / "cache"), "--trainer.default_root_dir", str(root)]


@pytest.fixture(scope="module")
def three_run(tiny_phantoms, t2_cohort, tmp_path_factory) -> Path:
    """``configs/three_cohorts.yaml`` trained for two steps on tiny phantoms with a tiny network."""
    root = tmp_path_factory.mktemp("three_run")
    assert main(["fit", *_fit_args(tiny_phantoms, t2_cohort, root)]) == 0
    return root


def _metrics(root: Path) -> list[dict]:
    rows = []
    for path in sorted(root.glob("**/metrics.csv")):
        rows += list(csv.DictReader(open(path)))
    return rows


def test_three_cohorts_config_fits_validates_and_tests(tiny_phantoms, t2_cohort, three_run):
    best = three_run / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert [c["name"] for c in checkpoint["datamodule_hyper_parameters"]["cohorts"]] == ["ct", "mri", "t2"]
    assert {k.split(".")[2] for k in checkpoint["state_dict"] if k.startswith("network.heads.")} == {"ct", "mri", "t2"}
    columns = set().union(*(row.keys() for row in _metrics(three_run)))
    for name in ("ct", "mri", "t2"):
        assert f"train/loss_{name}_step" in columns and f"val/dice_{name}_tumor" in columns
    assert "gates/stage1/t2_to_ct_step" in columns and "gates/stage1/ct_to_t2_step" in columns
    # every held-out case of the three cohorts (the tiny config stops after four volumes: CT and MRI only)
    assert main(["test", *_fit_args(tiny_phantoms, t2_cohort, three_run), "--ckpt_path", str(best),
                 "--trainer.limit_test_batches", "1.0"]) == 0
    summary = json.loads((three_run / "test" / "summary.json").read_text())
    assert set(summary["per_modality"]) == {"ct", "mri", "t2"}


def test_three_queue_batch_holds_one_subject_per_cohort(tiny_phantoms, t2_cohort, tmp_path):
    from lightning.pytorch.utilities import CombinedLoader

    dm = UnpairedDataModule(cohorts=_cohorts(tiny_phantoms, t2_cohort), cache_dir=str(tiny_phantoms / "cache"),
                            ct_spacing=(2.0, 2.0, 3.0), mri_spacing=(2.0, 2.0, 3.0), **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    prefixes = {"ct": "lits-", "mri": "atlas-", "t2": "t2_"}
    seen = {m: set() for m in prefixes}
    steps = 0
    for batch, _, _ in loader:
        steps += 1
        assert set(batch) == set(prefixes)
        for m, prefix in prefixes.items():
            assert batch[m]["image"].shape == (2, 1, 32, 32, 16)
            train_ids = {e["id"] for e in dm.train_entries[m]}
            assert all(i.startswith(prefix) and i in train_ids for i in batch[m]["id"])
            seen[m].update(batch[m]["id"])
    # each queue: samples_per_volume patches per training subject, batch_pairs per step
    assert steps == max(-(-len(dm.train_entries[m]) * 2 // 2) for m in prefixes)
    assert all(seen[m] == {e["id"] for e in dm.train_entries[m]} for m in prefixes)
    assert len({dm.val_entries[m][0]["id"] for m in prefixes}) == 3
    modalities = [item["modality"][0] for item in dm.val_dataloader()]
    assert modalities == sorted(modalities, key=["ct", "mri", "t2"].index) and set(modalities) == set(prefixes)


def test_cohorts_of_different_sizes_cycle_the_shorter_queues(tiny_phantoms, t2_cohort, tmp_path):
    import shutil

    from lightning.pytorch.utilities import CombinedLoader

    small = tmp_path / "T2"  # four of the six T2 cases
    shutil.copytree(t2_cohort, small)
    for path in sorted((small / "labelsTr").glob("*.nii.gz"))[4:]:
        path.unlink()
        (small / "imagesTr" / path.name.replace(".nii.gz", "_0000.nii.gz")).unlink()
    cohorts = _cohorts(tiny_phantoms, small)
    dm = UnpairedDataModule(cohorts=cohorts, cache_dir=str(tmp_path / "cache"), n_folds=2,
                            ct_spacing=(2.0, 2.0, 3.0), mri_spacing=(2.0, 2.0, 3.0), **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    n_train = {m: len(dm.train_entries[m]) for m in ("ct", "mri", "t2")}
    assert n_train["t2"] < n_train["ct"] and n_train["t2"] < n_train["mri"], n_train
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    served = {m: [] for m in n_train}
    for batch, _, _ in loader:
        for m in n_train:  # every step holds every cohort, the short one too
            assert batch[m]["image"].shape == (2, 1, 32, 32, 16)
            served[m] += batch[m]["id"]
    # samples_per_volume 2, batch_pairs 2: one step per training subject of the largest cohort
    steps = max(n_train.values())
    assert all(len(ids) == 2 * steps for ids in served.values())
    for m, ids in served.items():
        assert set(ids) == {e["id"] for e in dm.train_entries[m]}
    # the short queue was drawn past its end: an epoch of it holds 2 patches of each subject
    assert len(served["t2"]) > 2 * n_train["t2"]


def test_legacy_pair_fields_equal_cohorts_written_out(tiny_phantoms):
    common = dict(cache_dir=str(tiny_phantoms / "cache"), **SMALL)
    legacy = UnpairedDataModule(str(tiny_phantoms / "LiTS"), str(tiny_phantoms / "ATLAS"),
                                ct_spacing=(2.0, 2.0, 3.0), mri_spacing=(2.0, 2.0, 3.0), **common)
    named = UnpairedDataModule(cohorts=[
        {"name": "ct", "root": str(tiny_phantoms / "LiTS"), "format": "lits", "spacing": [2.0, 2.0, 3.0],
         "window": [-16.0, 176.0], "orientation": "RAS"},
        {"name": "mri", "root": str(tiny_phantoms / "ATLAS"), "format": "atlas", "spacing": [2.0, 2.0, 3.0],
         "window": [74.0, 511.0], "orientation": "LAS"},
    ], **common)
    assert legacy.modalities == named.modalities == ("ct", "mri")
    # the paper's settings, written independently of the code under test
    expected = {"ct": PreprocessSettings("ct", "RAS", (-16.0, 176.0), (2.0, 2.0, 3.0)),
                "mri": PreprocessSettings("mri", "LAS", (74.0, 511.0), (2.0, 2.0, 3.0))}
    for m in ("ct", "mri"):
        assert legacy.preprocess_settings(m) == named.preprocess_settings(m) == expected[m]
    batches = []
    for dm in (legacy, named):
        dm.prepare_data()
        dm.setup("fit")
        torch.manual_seed(0)
        batch, _, _ = next(iter(dm.train_dataloader()))
        batches.append(batch)
    for m in ("ct", "mri"):
        assert legacy.manifests[m].entries == named.manifests[m].entries  # same cache files
        for entries in ("train_entries", "val_entries", "test_entries"):
            assert getattr(legacy, entries)[m] == getattr(named, entries)[m]
        assert batches[0][m]["id"] == batches[1][m]["id"]
        assert torch.equal(batches[0][m]["image"], batches[1][m]["image"])


def test_preprocess_verb_builds_the_cache_and_folds_a_named_cohort_reads(t2_cohort, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["preprocess", "--data", str(t2_cohort), "--format", "nnunet", "--modality", "T2",
                 "--cache", str(cache), "--spacing", "2", "2", "3", "--window", "60", "420", "--no-progress"]) == 0
    folder = Path(capsys.readouterr().out.split(":")[0])
    assert folder.parent == cache and folder.name.startswith("t2-nnunet-")
    written = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    folds = json.loads((cache / "t2" / "splits.json").read_text())
    assert sorted(i for fold in folds for i in fold["val"]) == sorted(p.name[: -len(".nii.gz")]
                                                                      for p in (t2_cohort / "labelsTr").iterdir())

    dm = _t2_module(t2_cohort, cache)  # the same window and spacing, given in the config
    dm.prepare_data()
    dm.setup("fit")
    assert dm.manifests["t2"].folder == folder
    assert [{"train": f["train"], "val": f["val"]} for f in dm.splits["t2"]] == folds  # + its inner split
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == written  # reused, nothing rewritten


def test_preprocess_verb_refuses_a_modality_that_is_no_name(t2_cohort, tmp_path, capsys):
    code = main(["preprocess", "--data", str(t2_cohort), "--format", "nnunet", "--modality", "t-2",
                 "--cache", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "modality 't-2' is not a name" in err[0], err
    assert not any(tmp_path.iterdir())


def test_new_cohort_takes_mri_style_defaults(tiny_phantoms, t2_cohort):
    dm = UnpairedDataModule(cohorts=[{"name": "t2", "root": str(t2_cohort)}], mri_spacing=(3.0, 3.0, 4.0))
    assert dm.preprocess_settings("t2") == PreprocessSettings("t2", "LAS", (74.0, 511.0), (3.0, 3.0, 4.0))
    assert dm.formats == {"t2": "nnunet"}


@pytest.mark.parametrize("cohorts, expected", [
    ([{"name": "t2"}], "needs a name and a root"),
    ([{"name": "t2", "root": "x", "windows": [0, 1]}], "unknown key 'windows'"),
    ([{"name": "t2", "root": "x"}, {"name": "T2", "root": "y"}], "each name once"),
])
def test_bad_cohorts_give_one_line(cohorts, expected):
    from aqcf.errors import AqcfError

    with pytest.raises(AqcfError, match=expected):
        UnpairedDataModule(cohorts=cohorts)


def test_network_streams_without_cohorts_are_refused(tiny_phantoms, tmp_path, capsys):
    args = ["--config", str(THREE), "--config", str(TINY_CONFIG), "--data.cohorts", json.dumps(
        [{"name": "ct", "root": str(tiny_phantoms / "LiTS"), "format": "lits"},
         {"name": "mri", "root": str(tiny_phantoms / "ATLAS"), "format": "atlas"}]),
        "--data.cache_dir", str(tiny_phantoms / "cache"), "--trainer.default_root_dir", str(tmp_path)]
    assert main(["fit", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no cohort for t2" in lines[0], lines


def test_segment_t2_with_the_three_stream_checkpoint(three_run, t2_cohort, tmp_path, capsys):
    scan = sorted((t2_cohort / "imagesTr").glob("*.nii.gz"))[0]
    best = str(three_run / "checkpoints" / "best.ckpt")
    out = tmp_path / "out"
    assert main(["segment", str(scan), "--modality", "t2", "--ckpt", best, "--out", str(out),
                 "--overlap", "0.25", "--no-progress"]) == 0
    mask = nib.load(out / scan.name.replace(".nii.gz", "_seg.nii.gz"))
    assert mask.shape == nib.load(scan).shape
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    assert json.loads(out.joinpath(scan.name.replace(".nii.gz", "_seg.json")).read_text())["modality"] == "t2"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(scan), "--modality", "pet", "--ckpt", best, "--out", str(tmp_path / "o2")])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--modality 'pet'" in lines[0] and "ct, mri, t2" in lines[0], lines


def test_export_t2_is_the_present_stream_with_the_others_zero_filled(three_run, tmp_path):
    import torch

    from aqcf.inference.predictor import Predictor

    best = three_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "t2.pt"
    assert main(["export", "--ckpt", str(best), "--format", "torchscript", "--modality", "t2",
                 "--out", str(out)]) == 0
    settings = json.loads((tmp_path / "t2.pt.json").read_text())
    assert settings["modality"] == "t2" and settings["check"]["max_abs_difference"] <= 1e-4
    network = Predictor.from_checkpoint(best).network
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros_like(x)
    with torch.no_grad():
        expected = network.forward_streams({"ct": zeros, "mri": zeros, "t2": x})["t2"]
        got = torch.jit.load(str(out))(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


SWAPPED = {0: 0, 1: 2, 2: 1}


def _t2_module(root: Path, cache: Path, labels=None) -> UnpairedDataModule:
    cohort = {"name": "t2", "root": str(root), "window": [60.0, 420.0], "labels": labels}
    return UnpairedDataModule(cohorts=[cohort], cache_dir=str(cache), mri_spacing=(2.0, 2.0, 3.0), **SMALL)


@pytest.fixture(scope="module")
def t2_swapped(t2_cohort, tmp_path_factory) -> Path:
    """The T2 cohort with its mask values 1 and 2 swapped (tumor coded 1, liver 2)."""
    import shutil

    root = tmp_path_factory.mktemp("t2_swapped") / "T2"
    shutil.copytree(t2_cohort, root)
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        image = nib.load(path)
        labels = np.asarray(image.dataobj)
        swapped = np.where(labels == 1, 2, np.where(labels == 2, 1, labels)).astype(labels.dtype)
        nib.save(nib.Nifti1Image(swapped, image.affine, image.header), path)
    return root


def test_swapped_masks_with_declared_labels_cache_the_same_label_maps(t2_cohort, t2_swapped, tmp_path):
    from aqcf.data.cache import cohort_key
    from aqcf.data.cohorts import read_cohort

    sources = [np.asarray(nib.load(p).dataobj) for p in sorted((t2_swapped / "labelsTr").glob("*.nii.gz"))]
    originals = [np.asarray(nib.load(p).dataobj) for p in sorted((t2_cohort / "labelsTr").glob("*.nii.gz"))]
    assert any(((o == 1) & (s == 2)).any() and ((o == 2) & (s == 1)).any()
               for o, s in zip(originals, sources, strict=True))
    original = _t2_module(t2_cohort, tmp_path / "cache")
    swapped = _t2_module(t2_swapped, tmp_path / "cache", labels=yaml.safe_load("{0: 0, 1: 2, 2: 1}"))
    assert swapped.labels == {"t2": SWAPPED}
    for dm in (original, swapped):
        dm.prepare_data()
        dm.setup("fit")
    by_id = [dm.manifests["t2"].by_id() for dm in (original, swapped)]
    assert sorted(by_id[0]) == sorted(by_id[1]) and len(by_id[0]) == 6
    for case, entry in by_id[0].items():
        other = by_id[1][case]
        np.testing.assert_array_equal(np.asarray(nib.load(other["label"]).dataobj),
                                      np.asarray(nib.load(entry["label"]).dataobj))
        assert other["has_tumor"] == entry["has_tumor"] and other["voxel_counts"] == entry["voxel_counts"]
    assert any(e["has_tumor"] for e in by_id[0].values())
    # the mapping is part of the key: the same files with the default convention are another cache
    cases = read_cohort(t2_swapped, "nnunet", "t2")
    assert swapped.manifests["t2"].key != cohort_key(cases, swapped.preprocess_settings("t2"))


def test_label_value_the_mapping_does_not_cover_is_one_line_naming_the_file(t2_cohort, tmp_path):
    from aqcf.errors import AqcfError

    dm = _t2_module(t2_cohort, tmp_path / "cache", labels={0: "background", 1: "liver"})
    with pytest.raises(AqcfError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "\n" not in message
    assert str(t2_cohort / "labelsTr") in message and "label values {2}" in message
    assert "t2 cohort's labels {0: 0, 1: 1}" in message
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


def test_default_labels_leave_the_cache_key_unchanged(t2_cohort):
    import hashlib

    from aqcf.data.cache import cohort_key
    from aqcf.data.cohorts import read_cohort
    from aqcf.data.preprocess import DEFAULT_LABELS

    named = UnpairedDataModule(cohorts=[{"name": "t2", "root": str(t2_cohort), "labels": {"0": "background",
                                                                                            "1": "liver", "2": 2}}])
    plain = UnpairedDataModule(cohorts=[{"name": "t2", "root": str(t2_cohort)}])
    assert named.labels == plain.labels == {"t2": DEFAULT_LABELS}
    cases = read_cohort(t2_cohort, "nnunet", "t2")
    settings = plain.preprocess_settings("t2")
    # the key as it was computed before cohorts declared labels
    def fingerprint(path) -> list:
        return [str(Path(path).resolve()), Path(path).stat().st_size, Path(path).stat().st_mtime_ns]

    files = [[c.id, c.modality, fingerprint(c.image), fingerprint(c.label)] for c in cases]
    before = hashlib.sha256(json.dumps({"settings": settings.hash(), "cases": files}, sort_keys=True).encode())
    assert cohort_key(cases, settings) == cohort_key(cases, settings, named.labels["t2"]) == before.hexdigest()[:12]
    assert cohort_key(cases, settings, SWAPPED) != before.hexdigest()[:12]


@pytest.mark.parametrize("labels, expected", [
    ({0: 0, 1: 3}, r"data.cohorts\[0\].labels: mask value 1 maps to 3; classes are 0, 1, 2"),
    ({0: 0, "one": 1}, r"mask value 'one' is not an integer"),
    ({0: 0, 1: "bone"}, r"mask value 1 maps to 'bone'"),
    ({1: 1, "1": 2}, r"mask value 1 is given twice"),
    ("tumor", r"need a mapping from mask values to classes"),
])
def test_bad_labels_are_refused_at_construction(labels, expected):
    from aqcf.errors import AqcfError

    with pytest.raises(AqcfError, match=expected) as info:
        UnpairedDataModule(cohorts=[{"name": "t2", "root": "nowhere", "labels": labels}])
    assert "\n" not in str(info.value)
