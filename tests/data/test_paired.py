"""Paired fine-tuning: paired batches (one patient, one grid, one spatial transform), mixing, --init_from."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from aqcf.cli import main
from aqcf.data.datamodule import UnpairedDataModule
from aqcf.data.paired import augment_pair
from tests.conftest import REPO, TINY_CONFIG, tiny_fit_args

PAIRED_CONFIG = REPO / "configs" / "paired_finetune.yaml"
MARKER_WORLD = np.array([-6.0, 10.0, 3.0])  # mm, inside both fields of view below


def _save(array, affine, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _scan(shape, spacing, flips, centre_mm, body, marker, dtype=np.int16):
    """A uniform body, a bright marker cube at MARKER_WORLD (the tumor) inside a liver box of ±14 mm.

    ``flips`` negates axes of the affine (another orientation); the grid is centred at ``centre_mm``.
    """
    shape, spacing = np.array(shape), np.array(spacing, dtype=float)
    affine = np.diag([*(spacing * np.where(flips, -1, 1)), 1.0])
    affine[:3, 3] = centre_mm - affine[:3, :3] @ ((shape - 1) / 2)
    image = np.full(tuple(shape), body, dtype=dtype)
    label = np.zeros(tuple(shape), dtype=np.uint8)
    ijk = np.indices(tuple(shape)).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    near = (np.abs(world - MARKER_WORLD) <= spacing / 2 + 1.0).all(axis=1).reshape(tuple(shape))
    slab = (np.abs(world - MARKER_WORLD) <= 14).all(axis=1).reshape(tuple(shape))
    label[slab] = 1
    label[near] = 2
    image[near] = marker
    return image, label, affine


def _write_pair(root: Path) -> Path:
    """One paired patient: CT 2x2x3 mm RAS, MRI 1.5x1.5x2 mm LAS-like on a shifted, larger grid."""
    ct = _scan((40, 40, 20), (2, 2, 3), (False, False, False), np.zeros(3), body=80, marker=400)
    mri = _scan((60, 56, 32), (1.5, 1.5, 2.0), (True, False, False), np.array([2.0, -1.0, 1.0]), body=200,
                marker=1500)
    for modality, channel, (image, label, affine) in (("ct", 0, ct), ("mri", 1, mri)):
        _save(image, affine, root / "imagesTr" / f"pair_0_{channel:04d}.nii.gz")
        _save(label, affine, root / "labelsTr" / f"pair_0_{modality}.nii.gz")
    return root


def _module(phantoms: Path, cache: Path, **overrides) -> UnpairedDataModule:
    settings = dict(
        ct_root=str(phantoms / "LiTS"), mri_root=str(phantoms / "ATLAS"), cache_dir=str(cache),
        patch_size=(16, 16, 8), samples_per_volume=2, queue_length=4, batch_pairs=2, num_workers=0,
        ct_spacing=(2.0, 2.0, 3.0), mri_spacing=(2.0, 2.0, 3.0), progress=False,
    )
    dm = UnpairedDataModule(**{**settings, **overrides})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _batches(dm: UnpairedDataModule, n: int) -> list[dict]:
    out = []
    for batch in dm.train_dataloader():
        out.append(batch[0] if isinstance(batch, tuple) else batch)
        if len(out) == n:
            break
    return out


def test_paired_patches_share_patient_and_spatial_transform(tiny_phantoms, tmp_path):
    """The world marker lands at the same voxel of the CT and MRI patches, under flips and rotations."""
    root = _write_pair(tmp_path / "Paired")
    dm = _module(tiny_phantoms, tmp_path / "cache", paired_root=str(root), paired_ratio=1.0,
                 flip_prob=0.5, rot90_prob=0.5, label_probabilities={1: 0.7, 2: 0.3}, patch_size=(16, 16, 8))
    seen = 0
    torch.manual_seed(0)
    for _ in range(8):
        batch = next(iter(dm.train_dataloader()))
        assert batch["ct"]["id"] == batch["mri"]["id"] == ["pair_0", "pair_0"]
        assert batch["ct"]["image"].shape == batch["mri"]["image"].shape == (2, 1, 16, 16, 8)
        for b in range(2):
            ct, mri = batch["ct"]["image"][b, 0], batch["mri"]["image"][b, 0]
            ct_marker, mri_marker = batch["ct"]["label"][b, 0] == 2, batch["mri"]["label"][b, 0] == 2
            if ct_marker.sum() < 8:  # the marker (2x2x2 CT voxels) must lie wholly in the patch
                continue
            seen += 1
            ct_at = np.argwhere(ct_marker.numpy()).mean(axis=0)
            mri_at = np.argwhere(mri_marker.numpy()).mean(axis=0)
            assert np.abs(ct_at - mri_at).max() <= 0.75, (ct_at, mri_at)
            # the bright voxels of both images sit on the marker too
            assert ct_marker[ct > 0.75].all() and mri_marker[mri == mri.max()].all()
    assert seen >= 8


def test_augment_pair_applies_one_spatial_transform():
    from aqcf.data.augment import build_augmentation

    spatial = build_augmentation((8, 8, 4), 0.5, 0.5, 0.0, 0.0, 0.0, seed=3)
    intensity = {m: build_augmentation((8, 8, 4), 0.0, 0.0, 0.1, 0.1, 1.0, seed=s) for m, s in (("ct", 4), ("mri", 5))}
    base = torch.rand(1, 8, 8, 4)
    label = (base > 0.5).to(torch.uint8)
    changed = 0
    for _ in range(20):
        ct, mri = augment_pair(spatial, intensity, {"image": base, "label": label}, {"image": base, "label": label})
        assert torch.equal(ct["label"], mri["label"])
        # the intensity changes are affine per modality: the order of the voxels is the spatial one
        assert torch.equal(ct["image"].flatten().argsort(), mri["image"].flatten().argsort())
        assert not torch.allclose(ct["image"], mri["image"])
        changed += int(not torch.equal(ct["label"], label))
    assert changed >= 5


def test_ratio_zero_reproduces_unpaired_batches(tiny_phantoms, tmp_path):
    root = _write_pair(tmp_path / "Paired")
    batches = {}
    for name, extra in (("plain", {}), ("zero", {"paired_root": str(root), "paired_ratio": 0.0})):
        torch.manual_seed(7)
        dm = _module(tiny_phantoms, tmp_path / "cache", **extra)
        batches[name] = _batches(dm, 3)
    for a, b in zip(batches["plain"], batches["zero"], strict=True):
        for m in ("ct", "mri"):
            assert a[m]["id"] == b[m]["id"]
            assert torch.equal(a[m]["image"], b[m]["image"]) and torch.equal(a[m]["label"], b[m]["label"])


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_ratio_mixes_paired_and_unpaired_batches(tiny_phantoms, tmp_path, ratio):
    root = _write_pair(tmp_path / "Paired")
    dm = _module(tiny_phantoms, tmp_path / "cache", paired_root=str(root), paired_ratio=ratio, augment=False)
    loader = dm.train_dataloader()
    paired = unpaired = 0
    for epoch in range(4):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            if batch["ct"]["id"] == batch["mri"]["id"]:
                paired += 1
                assert batch["ct"]["id"][0].startswith("pair_")
            else:
                unpaired += 1
                assert batch["ct"]["id"][0].startswith("lits") and batch["mri"]["id"][0].startswith("atlas")
    total = paired + unpaired
    assert total == 4 * len(loader) and total >= 12
    if ratio == 1.0:
        assert unpaired == 0
    else:
        assert 0.2 * total <= paired <= 0.8 * total


def test_paired_options_refused(tiny_phantoms, tmp_path):
    from aqcf.errors import AqcfError

    with pytest.raises(AqcfError, match="paired_root"):
        UnpairedDataModule(str(tiny_phantoms / "LiTS"), str(tiny_phantoms / "ATLAS"), paired_ratio=0.5)
    with pytest.raises(AqcfError, match="paired_ratio"):
        UnpairedDataModule(str(tiny_phantoms / "LiTS"), str(tiny_phantoms / "ATLAS"), paired_root="x",
                           paired_ratio=1.5)
    root = _write_pair(tmp_path / "Paired")
    with pytest.raises(AqcfError, match="pair_9"):
        _module(tiny_phantoms, tmp_path / "cache", paired_root=str(root), paired_ratio=1.0, paired_cases=["pair_9"])


PROBE = '''
import torch
from lightning.pytorch.callbacks import Callback


class Probe(Callback):
    """Records, at the start of training, whether the weights equal a checkpoint's and the optimizer state."""

    def __init__(self, checkpoint: str, out: str):
        self.checkpoint, self.out = checkpoint, out

    def on_train_start(self, trainer, pl_module):
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        own = pl_module.state_dict()
        same = sorted(own) == sorted(state) and all(torch.equal(own[k].cpu(), state[k]) for k in state)
        optimizer = trainer.optimizers[0]
        torch.save({"same": same, "state": len(optimizer.state), "step": trainer.global_step,
                    "lr": optimizer.param_groups[0]["lr"]}, self.out)
'''


def test_init_from_loads_weights_not_training_state(tiny_phantoms, tiny_run, tmp_path, monkeypatch):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] > 0 and saved["optimizer_states"][0]["state"]  # a trained run's state
    (tmp_path / "probe_mod.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "probe.pt"
    probe = json.dumps({"class_path": "probe_mod.Probe", "init_args": {"checkpoint": str(ckpt), "out": str(out)}})
    root = tmp_path / "run"
    args = tiny_fit_args(tiny_phantoms, root, "--init_from", str(ckpt), "--trainer.callbacks+", probe,
                         "--model.optimizer.init_args.lr", "0.0007")
    assert main(["fit", *args]) == 0
    seen = torch.load(out, weights_only=False)
    assert seen == {"same": True, "state": 0, "step": 0, "lr": 0.0007}
    after = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert after["global_step"] == 2  # the new run's own counter (limit_train_batches 2), not 2 + 2
    key = next(k for k, v in saved["state_dict"].items() if v.is_floating_point() and "weight" in k)
    assert not torch.equal(after["state_dict"][key], saved["state_dict"][key])  # it trained from there


def test_init_from_refusals(tiny_phantoms, tiny_run, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    args = tiny_fit_args(tiny_phantoms, tmp_path / "a", "--init_from", str(ckpt), "--ckpt_path", str(ckpt))
    assert main(["fit", *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "--init_from" in err[-1] and "--ckpt_path" in err[-1] and len(err[-1]) < 200
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["fit", *tiny_fit_args(tiny_phantoms, tmp_path / "b", "--init_from", str(bad))]) != 0
    assert str(bad) in capsys.readouterr().err
    # another architecture (other widths): one line naming the checkpoint
    args = tiny_fit_args(tiny_phantoms, tmp_path / "c", "--init_from", str(ckpt),
                         "--model.network.init_args.widths", "[4, 4, 8, 8, 16, 16]")
    assert main(["fit", *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert str(ckpt) in err[-1] and "do not fit" in err[-1]


def test_paired_finetune_config_fits(tiny_phantoms, tiny_run, tmp_path):
    assert main(["synth", "--out", str(tmp_path / "paired"), "--n-ct", "0", "--n-mri", "0", "--paired", "2",
                 "--shape", "32", "32", "16", "--seed", "5", "--no-progress"]) == 0
    root = tmp_path / "run"
    args = tiny_fit_args(tiny_phantoms, root, "--config", str(PAIRED_CONFIG), "--config", str(TINY_CONFIG),
                         "--data.paired_root", str(tmp_path / "paired" / "Paired"), "--trainer.max_steps", "2",
                         "--init_from", str(tiny_run / "checkpoints" / "last.ckpt"),
                         config=REPO / "configs" / "demo.yaml")
    assert main(["fit", *args]) == 0
    after = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert after["global_step"] == 2
    hparams = after["datamodule_hyper_parameters"]
    assert hparams["paired_ratio"] == 0.5 and hparams["paired_root"].endswith("Paired")
