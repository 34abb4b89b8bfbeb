"""Table 7 ablations and the ``make ablations`` / ``make baselines`` loops.

Every ``configs/ablations/*.yaml`` trains a step on phantoms and switches exactly its component off.
The loops run with a stand-in ``aqcf`` (``AQCF=...``) that records its calls and writes checkpoints and
test summaries with known Dice values; the real ``aqcf report`` then writes the table, whose means,
SDs and % changes are checked against values worked out by hand.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aqcf.cli import main
from tests.conftest import REPO, tiny_fit_args

ABLATIONS = REPO / "configs" / "ablations"
ONE_STEP = ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0"]

# what each run's network has: fusion blocks, learned (adaptive) gates, quaternion layers, one shared
# bottleneck, decoder attention gates
FULL = {"fusion": True, "adaptive_gate": True, "quaternion": True, "shared_bottleneck": True, "attention_gates": True}
EXPECTED_PARTS = {
    "full": FULL,
    "no_adaptive_gate": {**FULL, "adaptive_gate": False},
    "no_cross_fusion": {**FULL, "fusion": False, "adaptive_gate": False},
    "no_quaternion": {**FULL, "quaternion": False},
    "no_shared_bottleneck": {**FULL, "shared_bottleneck": False},
    "no_attention_gates": {**FULL, "attention_gates": False},
}


def _parts(state_dict_keys) -> dict[str, bool]:
    keys = [k.removeprefix("network.") for k in state_dict_keys if k.startswith("network.")]
    return {
        "fusion": any(k.startswith("fusion.") for k in keys),
        "adaptive_gate": any(k.startswith("fusion.") and ".mlp." in k for k in keys),
        "quaternion": any(k.endswith("r_weight") for k in keys),
        "shared_bottleneck": any(k.startswith("bottleneck.0.") for k in keys)
        and not any(k.startswith(("bottleneck.ct.", "bottleneck.mri.")) for k in keys),
        "attention_gates": any(".attention_gate." in k for k in keys),
    }


def test_every_ablation_config_has_a_test():
    assert {p.stem for p in ABLATIONS.glob("*.yaml")} == set(EXPECTED_PARTS) - {"full"}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARTS))
def test_ablation_config_trains_without_its_component(name, tiny_phantoms, tmp_path):
    root = tmp_path / name
    extra = [] if name == "full" else ["--config", str(ABLATIONS / f"{name}.yaml")]
    assert main(["fit", *tiny_fit_args(tiny_phantoms, root, *extra, *ONE_STEP)]) == 0
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert _parts(checkpoint["state_dict"]) == EXPECTED_PARTS[name]
    with open(next(root.glob("csv/version_*/metrics.csv"))) as handle:
        columns = set(next(csv.reader(handle)))
    assert {"train/loss_ct_step", "train/loss_mri_step"} <= columns  # joint training on both cohorts


# ----------------------------------------------------------------------------------------- the loops

FAKE_AQCF = """#!{python}
import json, os, sys
from pathlib import Path

argv = sys.argv[1:]
with open(os.environ["FAKE_AQCF_LOG"], "a") as log:
    log.write(json.dumps(argv) + "\\n")
verb, args = argv[0], argv[1:]
if verb == "report":
    if not os.environ.get("FAKE_AQCF_REPORT"):
        sys.exit(0)
    from aqcf.cli import main
    sys.exit(main(argv))
option = lambda name: args[args.index(name) + 1]
root, run = Path(option("--trainer.default_root_dir")), option("--run_name")
if verb == "fit":
    if run == os.environ.get("FAKE_AQCF_FAIL"):
        sys.exit(1)
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in ("best", "last"):
        (root / "checkpoints" / (name + ".ckpt")).write_text("weights")
elif verb == "test":
    scores = json.loads(Path(os.environ["FAKE_AQCF_SCORES"]).read_text())[run][option("--data.fold")]
    per_modality = {{m: {{c: {{"dice": {{"mean": v}}}} for c, v in classes.items()}} for m, classes in scores.items()}}
    (root / "test").mkdir(parents=True, exist_ok=True)
    (root / "test" / "summary.json").write_text(json.dumps({{"per_modality": per_modality}}))
"""

# per fold, Dice of (CT liver, CT tumor, MRI liver, MRI tumor); fold means 0.82 and 0.84
FULL_SCORES = {"0": (0.90, 0.70, 0.94, 0.74), "1": (0.92, 0.72, 0.96, 0.76)}


def _scores(offset: float, modalities=("ct", "mri")) -> dict:
    folds = {}
    for fold, (ct_liver, ct_tumor, mri_liver, mri_tumor) in FULL_SCORES.items():
        values = {"ct": {"liver": ct_liver, "tumor": ct_tumor}, "mri": {"liver": mri_liver, "tumor": mri_tumor}}
        folds[fold] = {m: {c: v - offset for c, v in values[m].items()} for m in modalities}
    return folds


def _make(target: str, tmp_path: Path, scores: dict, *variables: str, fail: str = "",
          report: bool = True) -> subprocess.CompletedProcess:
    fake = tmp_path / "fake_aqcf"
    fake.write_text(FAKE_AQCF.format(python=sys.executable))
    fake.chmod(0o755)
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    venv = tmp_path / "venv"  # an up-to-date stand-in: `make venv` must not install anything
    venv.mkdir(exist_ok=True)
    (venv / ".installed").touch()
    env = {**os.environ, "FAKE_AQCF_LOG": str(tmp_path / "calls.jsonl"),
           "FAKE_AQCF_SCORES": str(tmp_path / "scores.json"), "FAKE_AQCF_FAIL": fail,
           "FAKE_AQCF_REPORT": "1" if report else ""}
    command = ["make", "--no-print-directory", "-C", str(REPO), target, f"VENV={venv}", f"AQCF={fake}",
               f"RUNS={tmp_path / 'runs'}", *variables]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "calls.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def _option(call: list[str], name: str) -> str | None:
    return call[call.index(name) + 1] if name in call else None


def _configs(call: list[str]) -> list[str]:
    return [call[i + 1] for i, arg in enumerate(call) if arg == "--config"]


def _table(path: Path) -> dict[str, dict]:
    with open(path) as handle:
        return {row["run"]: row for row in csv.DictReader(handle)}


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

ABLATION_OFFSETS = {"no_adaptive_gate": 0.01, "no_cross_fusion": 0.08, "no_quaternion": 0.04,
                    "no_shared_bottleneck": 0.02, "no_attention_gates": 0.005}


@needs_make
def test_make_ablations(tmp_path):
    scores = {"demo": _scores(0.0)} | {f"demo-{a}": _scores(d) for a, d in ABLATION_OFFSETS.items()}
    for run in scores:  # a fold outside the FOLDS of the second call: all zeros, must not reach the table
        scores[run]["2"] = {m: {c: 0.0 for c in ("liver", "tumor")} for m in ("ct", "mri")}
    done = _make("ablations", tmp_path, scores, "CONFIG=configs/demo.yaml", "FOLDS=0 1 2", report=False)
    assert done.returncode == 0, done.stderr

    calls = _calls(tmp_path)
    runs = ["demo"] + [f"demo-{a}" for a in ABLATION_OFFSETS]
    expected = [(verb, run, fold) for run in runs for fold in ("0", "1", "2") for verb in ("fit", "test")]
    assert [(c[0], _option(c, "--run_name"), _option(c, "--data.fold")) for c in calls[:-1]] == expected
    runs_dir = tmp_path / "runs"
    for call in calls[:-1]:
        run, fold = _option(call, "--run_name"), _option(call, "--data.fold")
        layered = [] if run == "demo" else [f"configs/ablations/{run.removeprefix('demo-')}.yaml"]
        assert _configs(call) == ["configs/demo.yaml", *layered]
        assert _option(call, "--trainer.default_root_dir") == str(runs_dir / run / f"fold{fold}")
        if call[0] == "fit":
            assert "--ckpt_path" not in call  # fresh folds start afresh
        else:
            assert _option(call, "--ckpt_path") == str(runs_dir / run / f"fold{fold}" / "checkpoints" / "best.ckpt")
    report = calls[-1]
    assert report[0] == "report" and _option(report, "--baseline") == "full_model"
    assert report[1:7] == ["full_model=" + str(runs_dir / "demo")] + [
        f"{a}={runs_dir / ('demo-' + a)}" for a in ABLATION_OFFSETS]
    assert _option(report, "--out") == str(runs_dir / "ablations_report" / "demo")

    # again, after fold 1 of one run was interrupted in training (last.ckpt, no test summary), on folds 0, 1
    (runs_dir / "demo-no_quaternion" / "fold1" / "test" / "summary.json").unlink()
    done = _make("ablations", tmp_path, scores, "CONFIG=configs/demo.yaml", "FOLDS=0 1")
    assert done.returncode == 0, done.stderr
    calls = _calls(tmp_path)
    assert [c[0] for c in calls] == ["fit", "test", "report"]  # finished folds are skipped
    fit, test = calls[0], calls[1]
    assert _option(fit, "--run_name") == "demo-no_quaternion" and _option(fit, "--data.fold") == "1"
    assert _option(fit, "--ckpt_path") == "last"
    assert _option(test, "--run_name") == "demo-no_quaternion" and _option(test, "--data.fold") == "1"

    # Table 7 over folds 0 and 1: the per-fold mean over liver, tumor, CT and MRI is 0.82 and 0.84 for
    # the full model (mean 0.83, sample SD 0.01·√2); each ablation lowers every score by its offset d
    table = _table(runs_dir / "ablations_report" / "demo" / "ablation.csv")
    assert list(table) == ["full_model", *ABLATION_OFFSETS]
    expected_change = {"no_adaptive_gate": -1.204819, "no_cross_fusion": -9.638554, "no_quaternion": -4.819277,
                       "no_shared_bottleneck": -2.409639, "no_attention_gates": -0.602410}
    expected_mean = {"full_model": 0.83, "no_adaptive_gate": 0.82, "no_cross_fusion": 0.75, "no_quaternion": 0.79,
                     "no_shared_bottleneck": 0.81, "no_attention_gates": 0.825}
    for run, row in table.items():
        assert float(row["mean_dice"]) == pytest.approx(expected_mean[run])
        assert float(row["sd"]) == pytest.approx(0.0141421356)
        assert row["n_folds"] == "2" and row["modalities"] == "ct+mri"
        if run == "full_model":
            assert row["change_percent"] == ""
        else:
            assert float(row["change_percent"]) == pytest.approx(expected_change[run], abs=1e-5)
    assert "Ablation view" in (runs_dir / "ablations_report" / "demo" / "report.md").read_text()


@needs_make
def test_make_stops_at_a_failed_fit(tmp_path):
    scores = {"demo": _scores(0.0)} | {f"demo-{a}": _scores(d) for a, d in ABLATION_OFFSETS.items()}
    done = _make("ablations", tmp_path, scores, "CONFIG=configs/demo.yaml", "FOLDS=0", fail="demo-no_cross_fusion")
    assert done.returncode != 0
    calls = _calls(tmp_path)
    assert calls[-1][0] == "fit" and _option(calls[-1], "--run_name") == "demo-no_cross_fusion"
    assert not (tmp_path / "runs" / "ablations_report").exists()


@needs_make
def test_make_baselines(tmp_path):
    sizes = tmp_path / "sizes"
    sizes.mkdir()
    (sizes / "unetr.yaml").write_text("model: {}\n")
    scores = {"lits_atlas": _scores(0.0), "lits_atlas-unimodal_ct": _scores(0.05, ("ct",)),
              "lits_atlas-unetr_joint": _scores(0.1)}
    done = _make("baselines", tmp_path, scores, "FOLDS=0 1", "BASELINES=unimodal_ct unetr_joint",
                 f"BASELINE_SIZES={sizes}")
    assert done.returncode == 0, done.stderr
    calls = _calls(tmp_path)
    configs = {_option(c, "--run_name"): _configs(c) for c in calls if c[0] == "fit"}
    assert configs == {
        "lits_atlas": ["configs/lits_atlas.yaml"],  # the Makefile's default CONFIG
        "lits_atlas-unimodal_ct": ["configs/lits_atlas.yaml", "configs/baselines/unimodal_ct.yaml"],
        "lits_atlas-unetr_joint": ["configs/lits_atlas.yaml", "configs/baselines/unetr_joint.yaml",
                                   str(sizes / "unetr.yaml")],
    }
    table = _table(tmp_path / "runs" / "baselines_report" / "lits_atlas" / "ablation.csv")
    assert list(table) == ["full_model", "unimodal_ct", "unetr_joint"]
    # CT only: fold means (0.85 + 0.65) / 2 = 0.75 and 0.77 -> 0.76, i.e. 100 · (0.76 − 0.83) / 0.83
    assert table["unimodal_ct"]["modalities"] == "ct"
    assert float(table["unimodal_ct"]["mean_dice"]) == pytest.approx(0.76)
    assert float(table["unimodal_ct"]["change_percent"]) == pytest.approx(-8.433735, abs=1e-5)
    assert float(table["unetr_joint"]["change_percent"]) == pytest.approx(-12.048193, abs=1e-5)
    ct_table = _table(tmp_path / "runs" / "baselines_report" / "lits_atlas" / "table_ct.csv")
    assert float(ct_table["unimodal_ct"]["dice_tumor_mean"]) == pytest.approx((0.65 + 0.67) / 2)
    mri_table = _table(tmp_path / "runs" / "baselines_report" / "lits_atlas" / "table_mri.csv")
    assert "unimodal_ct" not in mri_table
