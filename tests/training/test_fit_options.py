"""fit's own validation overlap, the non-finite guard, the step timer and the compile switch."""

from __future__ import annotations

import hashlib

import pytest
import torch

import aqcf.networks.sliding_window as sliding_window
from aqcf.cli import main
from aqcf.models.segmentation import SegmentationModule
from aqcf.networks.aqcfnet import AQCFNet
from aqcf.training.timing import StepTimer
from tests.conftest import tiny_fit_args

TINY = (2, 2, 4, 4, 8, 8)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def volume_batch(modality: str, case: str, spacing=(1.0, 1.0, 1.0)) -> dict:
    """One random whole volume of 48x32x16 voxels, batched as the volume loaders batch it."""
    return {
        "image": torch.rand(1, 1, 48, 32, 16),
        "label": torch.randint(0, 3, (1, 1, 48, 32, 16)),
        "modality": [modality],
        "id": [case],
        "spacing": [spacing],
    }


def test_validation_uses_val_overlap_and_test_the_paper_overlap(monkeypatch):
    seen = []
    real = sliding_window.sliding_window_inference

    def spy(*args, **kwargs):
        seen.append(kwargs["overlap"])
        return real(*args, **kwargs)

    # validation and test share the predictor's sliding-window core
    monkeypatch.setattr(sliding_window, "sliding_window_inference", spy)
    module = SegmentationModule(AQCFNet(widths=TINY), patch_size=(32, 32, 16), sw_overlap=0.8, val_overlap=0.25)
    module.eval()
    batch = volume_batch("ct", "c0")
    module.log = lambda *a, **k: None
    with torch.no_grad():
        module._evaluate_volume(batch, "val")
        module._evaluate_volume(batch, "test")
    assert seen == [0.25, 0.8]
    assert SegmentationModule(AQCFNet(widths=TINY), sw_overlap=0.7, val_overlap=None).val_overlap == 0.7
    with pytest.raises(ValueError, match="val_overlap 1.0"):
        SegmentationModule(AQCFNet(widths=TINY), val_overlap=1.0)


def test_step_timer_splits_data_wait_from_the_step(monkeypatch):
    clock = iter([0.0, 0.3, 1.0, 1.3, 2.0, 2.6, 3.0])  # epoch start, then (batch start, batch end) x 3
    monkeypatch.setattr("aqcf.training.timing.time.perf_counter", lambda: next(clock))
    timer = StepTimer(skip_first=1)
    timer.on_train_epoch_start(None, None)
    for i in range(3):
        timer.on_train_batch_start(None, None, None, i)
        timer.on_train_batch_end(None, None, None, None, i)
    # steps 2 and 3 are timed: waits 1.3 - 1.0 and 2.6 - 2.0, steps 2.0 - 1.3 and 3.0 - 2.6
    values = timer.summary()
    assert values["perf/data_wait_fraction"] == pytest.approx(0.9 / 2.0)
    assert values["perf/step_s"] == pytest.approx(1.1 / 2)
    assert values["perf/steps_per_s"] == pytest.approx(2 / 2.0)


def test_fit_reports_throughput_per_epoch(tiny_phantoms, tmp_path, capsys):
    import csv

    args = tiny_fit_args(tiny_phantoms, tmp_path / "run", "--step_timer.skip_first", "0")
    assert main(["fit", *args]) == 0
    assert "steps/s, step" in capsys.readouterr().out
    rows = list(csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    waits = [float(r["perf/data_wait_fraction"]) for r in rows if r.get("perf/data_wait_fraction")]
    assert len(waits) == 1 and 0.0 <= waits[0] <= 1.0


def test_non_finite_batch_stops_fit_and_keeps_the_last_checkpoint(tiny_phantoms, tmp_path, monkeypatch, capsys):
    root = tmp_path / "run"
    args = tiny_fit_args(tiny_phantoms, root, "--checkpoint.every_n_train_steps", "1")
    assert main(["fit", *args]) == 0
    last = root / "checkpoints" / "last.ckpt"
    before = _sha(last)
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]

    real_step = SegmentationModule.training_step

    def poisoned(self, batch, batch_idx):
        batch["ct"]["image"] = batch["ct"]["image"] * float("nan")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(SegmentationModule, "training_step", poisoned)
    capsys.readouterr()
    code = main(["fit", *args, "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("aqcf: error:")]
    assert len(lines) == 1 and f"training step {step}: non-finite" in lines[0]
    assert "CT lits-" in lines[0] and "MRI atlas-" in lines[0]
    assert "Traceback" not in err
    assert _sha(last) == before


@pytest.mark.slow
@pytest.mark.parametrize("product", ["auto", "fast"])  # fast: grouped convolutions and matrix products
def test_compiled_network_gives_the_eager_outputs_and_keeps_its_keys(product):
    torch.manual_seed(0)
    network = AQCFNet(widths=TINY, quaternion_product=product)
    eager = AQCFNet(widths=TINY, quaternion_product=product)
    eager.load_state_dict(network.state_dict())
    module = SegmentationModule(network, compile=True, compile_backend="aot_eager")
    module.configure_model()
    ct, mri = torch.rand(1, 1, 32, 32, 16), torch.rand(1, 1, 32, 32, 16)
    for got, want in zip(module.network(ct, mri), eager(ct, mri), strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(module.network.forward_single(mri, "mri"), eager.forward_single(mri, "mri"))
    assert list(module.network.state_dict()) == list(eager.state_dict())


def test_the_test_fold_never_reaches_fit_and_the_summary_names_the_protocol(
    tiny_phantoms, tmp_path, monkeypatch
):
    import json

    seen = {"train": set(), "val": set()}
    real_train, real_val = SegmentationModule.training_step, SegmentationModule.validation_step

    def training_step(self, batch, batch_idx):
        seen["train"] |= {i for m in batch for i in batch[m]["id"]}
        return real_train(self, batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        seen["val"] |= set(batch["id"])
        return real_val(self, batch, batch_idx)

    monkeypatch.setattr(SegmentationModule, "training_step", training_step)
    monkeypatch.setattr(SegmentationModule, "validation_step", validation_step)
    root = tmp_path / "run"
    cache = tmp_path / "cache"
    args = [*tiny_fit_args(tiny_phantoms, root), "--data.cache_dir", str(cache),
            "--trainer.limit_train_batches", "6"]
    assert main(["fit", *args]) == 0
    test_fold, inner = set(), set()
    for modality in ("ct", "mri"):
        fold = json.loads((cache / modality / "splits.json").read_text())[0]
        test_fold |= set(fold["val"])
        inner |= set(fold["inner_val"])
    assert seen["train"] and seen["val"] == inner
    assert not (seen["train"] | seen["val"]) & test_fold
    assert main(["test", *args, "--ckpt_path", str(root / "checkpoints" / "last.ckpt")]) == 0
    summary = json.loads((root / "test" / "summary.json").read_text())
    assert summary["source"]["protocol"] == "inner" and summary["source"]["inner_folds"] == 5
    assert {row["case"] for row in _csv_rows(root / "test" / "metrics.csv")} == test_fold


def _csv_rows(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_pooled_dice_sums_over_volumes_before_dividing():
    from aqcf.models.segmentation import PooledDice

    metric = PooledDice(num_classes=2)
    pred = torch.zeros(1, 2, 4, 4, 4, dtype=torch.bool)
    ref = torch.zeros_like(pred)
    pred[0, 0, :2] = True  # 32 voxels, 16 of them in the reference
    ref[0, 0, 1:3] = True  # 32 voxels
    metric.update(pred, ref)
    pred2 = torch.zeros_like(pred)
    pred2[0, 1, 0, 0, 0] = True  # one false-positive tumor voxel in a tumor-free case
    metric.update(pred2, torch.zeros_like(pred))
    liver, tumor = metric.compute().tolist()
    assert liver == pytest.approx(2 * 16 / (32 + 32))
    assert tumor == 0.0  # pooled: the false positive counts, 0 / (1 + 0)
    metric.reset()
    assert torch.isnan(metric.compute()).all()
