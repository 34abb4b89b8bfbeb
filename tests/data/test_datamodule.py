"""UnpairedDataModule: unpaired CT + MRI patch batches, folds, whole-volume loaders, DDP sharding."""

from __future__ import annotations

import json

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

import aqcf.data.datamodule as datamodule
from aqcf.data.datamodule import UnpairedDataModule, preprocess_settings_from_hparams
from aqcf.data.phantoms import ct_config, mri_config, synthesize
from aqcf.data.preprocess import restore_to_original

PATCH = (32, 32, 16)
# 24 x 24 x 12 voxels at 2 x 2 x 3 mm: about 40 x 40 x 36 voxels once cropped and resampled to 1 mm
SMALL = dict(shape=(24, 24, 12), spacing=(2.0, 2.0, 3.0))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm")
    synthesize(
        out / "phantoms",
        n_ct=5,
        n_mri=5,
        ct=ct_config(**SMALL, n_tumors=(1, 2)),
        mri=mri_config(**SMALL),
        progress=False,
    )
    return out


def _module(roots, **kwargs) -> UnpairedDataModule:
    options = dict(
        cache_dir=str(roots / "cache"),
        patch_size=PATCH,
        samples_per_volume=2,
        queue_length=4,
        num_workers=0,
        progress=False,
        augment=False,
    )
    options.update(kwargs)
    dm = UnpairedDataModule(str(roots / "phantoms" / "LiTS"), str(roots / "phantoms" / "ATLAS"), **options)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _batches(loader, n: int):
    iterator = iter(loader)
    out = []
    while len(out) < n:
        try:
            item = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        out.append(item[0] if isinstance(item, tuple) else item)
    return out


def test_batch_has_one_ct_and_one_mri_patch_with_integer_labels(roots):
    dm = _module(roots, augment=True, flip_prob=1.0, rot90_prob=1.0)
    for batch in _batches(dm.train_dataloader(), 4):
        assert set(batch) == {"ct", "mri"}
        for modality in ("ct", "mri"):
            image, label = batch[modality]["image"], batch[modality]["label"]
            assert image.shape == (1, 1, *PATCH) and image.dtype == torch.float32
            assert label.shape == (1, 1, *PATCH) and label.dtype == torch.uint8
            assert set(label.unique().tolist()) <= {0, 1, 2}
            assert torch.isfinite(image).all()


def test_ct_and_mri_subjects_are_drawn_independently(roots):
    dm = _module(roots)
    pairs = [(b["ct"]["id"][0], b["mri"]["id"][0]) for b in _batches(dm.train_dataloader(), 48)]
    ct_ids = {c for c, _ in pairs}
    assert ct_ids == {e["id"] for e in dm.train_entries["ct"]}
    assert {m for _, m in pairs} == {e["id"] for e in dm.train_entries["mri"]}
    # a fixed pairing would give at most four distinct pairs; independent draws give many
    assert len(set(pairs)) >= 8
    assert all(len({m for c2, m in pairs if c2 == c}) >= 2 for c in ct_ids)


def test_batch_pairs_and_patches_larger_than_the_volume(roots):
    dm = _module(roots, batch_pairs=3, patch_size=(64, 64, 16))
    batch = _batches(dm.train_dataloader(), 1)[0]
    assert batch["ct"]["image"].shape == (3, 1, 64, 64, 16) and batch["mri"]["label"].shape == (
        3,
        1,
        64,
        64,
        16,
    )


def test_patches_centred_on_the_requested_label(roots):
    dm = _module(roots, label_probabilities={0: 0.0, 1: 0.0, 2: 1.0})
    centre = tuple(n // 2 for n in PATCH)
    for batch in _batches(dm.train_dataloader(), 6):
        for modality in ("ct", "mri"):
            assert batch[modality]["label"][0, 0][centre] == 2


def test_folds_written_and_used_under_the_paper_reading(roots):
    dm = _module(roots, fold=2, protocol="heldout")
    for modality in ("ct", "mri"):
        splits = json.loads((roots / "cache" / modality / "splits.json").read_text())
        assert len(splits) == 5
        assert [e["id"] for e in dm.val_entries[modality]] == splits[2]["val"]
        assert [e["id"] for e in dm.test_entries[modality]] == splits[2]["val"]
        assert sorted(e["id"] for e in dm.train_entries[modality]) == sorted(splits[2]["train"])
        assert len(splits[2]["val"]) == 1


def test_inner_protocol_selects_on_training_cases_and_leaves_the_test_fold_alone(roots):
    dm = _module(roots, fold=2)
    for modality in ("ct", "mri"):
        splits = json.loads((roots / "cache" / modality / "splits.json").read_text())
        test = set(splits[2]["val"])
        inner = set(splits[2]["inner_val"])
        train = {e["id"] for e in dm.train_entries[modality]}
        val = {e["id"] for e in dm.val_entries[modality]}
        assert {e["id"] for e in dm.test_entries[modality]} == test
        assert val == inner and inner <= set(splits[2]["train"]) and len(inner) == 1
        assert not (train | val) & test and not train & val
        assert train | val == set(splits[2]["train"])
        # fixed in the file: a second module reads the same inner set
        assert {e["id"] for e in _module(roots, fold=2).val_entries[modality]} == inner
    with pytest.raises(ValueError, match="protocol 'both'"):
        _module(roots, protocol="both")


def test_validation_volumes_ct_first_then_mri(roots):
    dm = _module(roots, fold=1, protocol="heldout")
    items = list(dm.val_dataloader())
    assert [i["modality"] for i in items] == [["ct"], ["mri"]]
    assert [i["id"][0] for i in items] == [dm.val_entries["ct"][0]["id"], dm.val_entries["mri"][0]["id"]]
    for item in items:
        assert item["image"].ndim == 5 and item["image"].shape[:2] == (1, 1)
        assert item["label"].shape == item["image"].shape and item["label"].dtype == torch.int64
        assert all(n % 16 == 0 for n in item["image"].shape[2:])
    assert [i["id"] for i in dm.test_dataloader()] == [i["id"] for i in items]


def test_predict_items_carry_what_restores_the_original_geometry(roots):
    dm = _module(roots)
    item = next(iter(dm.predict_dataloader()))
    record = item["record"][0]
    restored = restore_to_original(item["label"][0, 0].numpy(), record)
    original = np.asarray(nib.load(record["source_label"]).dataobj)
    assert np.array_equal(restored, original)


def test_preprocessing_settings_come_from_the_hyperparameters(roots):
    dm = _module(roots, ct_window=(-100.0, 200.0), mri_spacing=(2.0, 2.0, 2.0))
    assert dm.preprocess_settings("ct").window == (-100.0, 200.0)
    assert dm.preprocess_settings("mri").spacing == (2.0, 2.0, 2.0)
    assert dm.preprocess_settings("mri").orientation == "LAS"
    assert dm.hparams["ct_window"] == (-100.0, 200.0)
    assert np.allclose(nib.load(dm.val_entries["mri"][0]["image"]).header.get_zooms(), 2.0)


def test_ranks_see_different_subjects_and_volumes(roots, monkeypatch):
    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(datamodule, "_distributed", lambda rank=rank: (rank, 2))
        dm = _module(roots, protocol="heldout")
        ids = {b["ct"]["id"][0] for b in _batches(dm.train_dataloader(), 8)}
        seen[rank] = ids
        all_val = [e["id"] for m in ("ct", "mri") for e in dm.val_entries[m]]
        assert [i["id"][0] for i in dm.val_dataloader()] == all_val[rank::2]
    assert len(seen[0]) == len(seen[1]) == 2 and not seen[0] & seen[1]


class _Probe(L.LightningModule):
    """Records what the Trainer hands to training_step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.shapes = []

    def training_step(self, batch, batch_idx):
        self.shapes.append({m: tuple(batch[m]["image"].shape) for m in batch})
        return (self.weight * batch["ct"]["image"].mean() + self.weight * batch["mri"]["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_consumes_the_unpaired_batches(roots, tmp_path):
    dm = UnpairedDataModule(
        str(roots / "phantoms" / "LiTS"),
        str(roots / "phantoms" / "ATLAS"),
        cache_dir=str(roots / "cache"),
        patch_size=PATCH,
        samples_per_volume=2,
        queue_length=4,
        num_workers=0,
        progress=False,
    )
    probe = _Probe()
    trainer = L.Trainer(
        max_epochs=2,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
        enable_model_summary=False,
    )
    trainer.fit(probe, datamodule=dm)
    # two epochs of 3 training subjects (4 less the inner validation case) x 2 patches per volume
    assert len(probe.shapes) == 2 * 3 * 2
    assert all(s == {"ct": (1, 1, *PATCH), "mri": (1, 1, *PATCH)} for s in probe.shapes)
    # inference rebuilds the preprocessing from the checkpoint alone
    trainer.save_checkpoint(tmp_path / "probe.ckpt")
    hparams = torch.load(tmp_path / "probe.ckpt", weights_only=False)["datamodule_hyper_parameters"]
    for modality in ("ct", "mri"):
        assert preprocess_settings_from_hparams(hparams, modality) == dm.preprocess_settings(modality)
    assert preprocess_settings_from_hparams(hparams, "mri").window == (74.0, 511.0)
