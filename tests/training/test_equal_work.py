"""Comparisons at equal work: the plateau schedule's patience, equal-steps budgets, seeds, seed units."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from aqcf.cli import main
from aqcf.evaluation.report import load_run
from tests.conftest import REPO, tiny_fit_args


@pytest.mark.parametrize("config", ["lits_atlas.yaml", "demo.yaml"])
def test_plateau_halves_the_rate_after_four_epochs_without_improvement(config):
    scheduler = yaml.safe_load((REPO / "configs" / config).read_text())["model"]["scheduler"]
    assert scheduler["class_path"] == "torch.optim.lr_scheduler.ReduceLROnPlateau"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **scheduler["init_args"])
    rates = []
    for dice in [0.5, 0.5, 0.5, 0.5, 0.5]:  # one best epoch, then four without improvement
        plateau.step(dice)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == [1.0, 1.0, 1.0, 1.0, 0.5]


def _weights(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_equal_steps_budget_and_seeds(tiny_phantoms, tmp_path):
    budget = ["--trainer.max_time", "null", "--trainer.max_steps", "3", "--trainer.max_epochs", "-1",
              "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0"]
    runs = {
        "full_s1": ["--seed_everything", "1"],
        "full_s1_again": ["--seed_everything", "1"],
        "full_s2": ["--seed_everything", "2"],
        "no_quaternion_s1": ["--seed_everything", "1", "--config", str(REPO / "configs/ablations/no_quaternion.yaml")],
    }
    for name, extra in runs.items():
        assert main(["fit", *tiny_fit_args(tiny_phantoms, tmp_path / name), *budget, *extra]) == 0
    steps = {name: _weights(tmp_path / name)["global_step"] for name in runs}
    assert set(steps.values()) == {3}  # two epochs of two batches, cut at three steps, for every variant
    first, again, other = (_weights(tmp_path / n)["state_dict"] for n in ("full_s1", "full_s1_again", "full_s2"))
    assert all(torch.equal(first[k], again[k]) for k in first)  # a seed reproduces the run
    assert any(not torch.equal(first[k], other[k]) for k in first)  # another seed changes it


def test_report_pairs_runs_on_fold_and_seed_units(tmp_path):
    summary = {"per_modality": {"ct": {"liver": {"dice": {"mean": 0.9}}}}, "source": {"protocol": "inner"}}
    for unit in ("fold0", "fold1", "seed1/fold0", "seed1/fold1", "seed2/fold0"):
        folder = tmp_path / "run" / unit / "test"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary))
    run = load_run("run", tmp_path / "run", ["fold[01]/test/summary.json", "seed1/fold[01]/test/summary.json"])
    assert sorted(run.folds) == ["fold0", "fold0/seed1", "fold1", "fold1/seed1"]
    assert sorted(run.folds) != sorted(load_run("all", tmp_path / "run").folds)  # seed 2 only without patterns
    assert run.protocols == {"inner"}
