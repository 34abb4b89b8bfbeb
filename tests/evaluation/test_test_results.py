"""`aqcf test` results: the module returns each case, TestResultsWriter scores, draws and writes them."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from aqcf.cli import main
from aqcf.evaluation.test_results import TestResultsWriter
from aqcf.models.segmentation import SegmentationModule
from aqcf.networks.aqcfnet import AQCFNet
from aqcf.networks.sliding_window import WindowSettings
from tests.conftest import tiny_fit_args
from tests.training.test_fit_options import volume_batch
from tests.training.test_training import run_on_cpus

TINY = (2, 2, 4, 4, 8, 8)
CLASSES = {"liver": (1, 2), "tumor": (2,)}


def _counts(prediction: np.ndarray, reference: np.ndarray) -> dict[str, tuple[int, int, int]]:
    """(predicted, reference, shared) voxels per class, liver = labels {1, 2}."""
    counts = {}
    for name, values in CLASSES.items():
        p, r = np.isin(prediction, values), np.isin(reference, values)
        counts[name] = (int(p.sum()), int(r.sum()), int((p & r).sum()))
    return counts


def _rows(path) -> dict[tuple[str, str, str], dict]:
    with open(path) as f:
        return {(r["modality"], r["case"], r["class"]): r for r in csv.DictReader(f)}


def test_test_step_writes_nothing_and_returns_the_case(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = SegmentationModule(AQCFNet(widths=TINY), patch_size=(32, 32, 16)).eval()
    module.log = lambda *a, **k: None
    batch = volume_batch("mri", "m0", (1.5, 1.5, 3.0))
    with torch.no_grad():
        case = module.test_step(batch, 0)
    assert list(tmp_path.iterdir()) == []
    assert (case["id"], case["modality"], case["spacing"]) == ("m0", "mri", (1.5, 1.5, 3.0))
    np.testing.assert_array_equal(case["image"], batch["image"][0, 0].numpy())
    np.testing.assert_array_equal(case["label"], batch["label"][0, 0].numpy())
    assert case["prediction"].shape == (48, 32, 16) and set(np.unique(case["prediction"])) <= {0, 1, 2}
    # test and predict share the deployed window settings' defaults
    assert module.sw_batch_size == WindowSettings().batch_size


def _case(case_id: str, modality: str, prediction: np.ndarray, label: np.ndarray) -> dict:
    return {"id": case_id, "modality": modality, "spacing": (1.0, 1.0, 2.0), "image": np.zeros(label.shape, np.float32),
            "label": label, "prediction": prediction}


def test_writer_scores_each_case_and_draws_test_overlays_per_modality(tmp_path):
    rng = np.random.default_rng(0)
    cases = [_case(f"c{i}", "ct", rng.integers(0, 3, (12, 10, 8)), rng.integers(0, 3, (12, 10, 8))) for i in range(3)]
    cases.append(_case("m0", "mri", rng.integers(0, 3, (12, 10, 8)), rng.integers(0, 3, (12, 10, 8))))
    info = {"checkpoint": "best.ckpt", "protocol": "heldout", "fold": 0}
    module = SimpleNamespace(test_output=str(tmp_path / "out"), test_overlays=2, test_info=lambda: info)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"), is_global_zero=True)
    writer = TestResultsWriter()
    writer.on_test_epoch_start(trainer, module)
    for i, case in enumerate([*cases[:2], None, *cases[2:]]):  # None: a modality the model does not serve
        writer.on_test_batch_end(trainer, module, case, None, i)
    writer.on_test_epoch_end(trainer, module)
    rows = _rows(tmp_path / "out" / "metrics.csv")
    assert len(rows) == 2 * len(cases)
    for case in cases:
        for name, (predicted, reference, shared) in _counts(case["prediction"], case["label"]).items():
            row = rows[(case["modality"], case["id"], name)]
            assert (int(row["pred_voxels"]), int(row["ref_voxels"]), int(row["intersection"])) == (
                predicted, reference, shared)
            assert float(row["dice"]) == pytest.approx(2 * shared / (predicted + reference))
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == ["ct_c0.png", "ct_c1.png", "mri_m0.png"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["source"] == info
    assert not (tmp_path / "run").exists()


def test_aqcf_test_writes_the_rows_of_scoring_its_predictions_independently(tiny_phantoms, tiny_run, tmp_path):
    """Every metrics.csv row: voxel counts and Dice of a plain MONAI sliding window over the test volumes."""
    from aqcf.data.datamodule import UnpairedDataModule

    best = tiny_run / "checkpoints" / "best.ckpt"
    root = tmp_path / "run"
    assert main(["test", *tiny_fit_args(tiny_phantoms, root, "--ckpt_path", str(best))]) == 0
    rows = _rows(root / "test" / "metrics.csv")
    module = SegmentationModule.load_from_checkpoint(best, map_location="cpu").eval()
    hparams = torch.load(best, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    data = UnpairedDataModule(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    data.prepare_data()
    data.setup("test")
    scored = set()
    for batch in data.test_dataloader():
        modality, case = batch["modality"][0], batch["id"][0]
        with torch.no_grad():
            logits = sliding_window_inference(
                batch["image"], module.patch_size, module.sw_batch_size,
                lambda x, m=modality: module.network.forward_single(x, m), overlap=module.sw_overlap,
                mode=module.sw_mode,
            )
        counts = _counts(logits.argmax(dim=1)[0].numpy(), batch["label"][0, 0].numpy())
        for name, (predicted, reference, shared) in counts.items():
            row = rows[(modality, case, name)]
            assert (int(row["pred_voxels"]), int(row["ref_voxels"]), int(row["intersection"])) == (
                predicted, reference, shared)
            assert float(row["dice"]) == pytest.approx(2 * shared / (predicted + reference) if predicted + reference
                                                       else 1.0, abs=1e-6)
            scored.add((modality, case, name))
        assert (root / "test" / "overlays" / f"{modality}_{case}.png").is_file()  # test_overlays: 4 per modality
    assert scored == set(rows) and len(scored) == 8  # two held-out cases per cohort, two classes
    summary = json.loads((root / "test" / "summary.json").read_text())
    assert summary["source"]["checkpoint"] == str(best)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_ddp_test_gathers_every_ranks_cases(tiny_phantoms, tiny_run, tmp_path):
    """`aqcf test` under DDP (gloo, 2 CPU processes): rank zero writes the rows of both ranks' cases."""
    written = {}
    for devices in (1, 2):
        root = tmp_path / f"ddp{devices}"
        run_on_cpus("test", tiny_phantoms, tiny_run / "checkpoints" / "best.ckpt", root, devices)
        written[devices] = (root / "test" / "metrics.csv").read_text()
    assert len(written[1].splitlines()) == 1 + 8
    assert written[2] == written[1]
