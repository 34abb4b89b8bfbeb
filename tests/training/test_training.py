"""`aqcf fit|validate|test` end to end on tiny phantoms: configs, checkpoints, resume, errors, W&B, DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aqcf.cli import main
from tests.conftest import REPO, tiny_fit_args


def _metrics(root: Path) -> dict[str, float]:
    """Last logged value of every metric in the run's CSV logs."""
    values: dict[str, float] = {}
    for path in sorted(root.glob("**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def test_paper_config_trains_and_checkpoints(tiny_run):
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # limit_train_batches: 2, max_epochs: 1
    # the config rides in the checkpoint, so a checkpoint rebuilds its own network and preprocessing
    assert ckpt["hyper_parameters"]["network"]["class_path"] == "aqcf.networks.aqcfnet.AQCFNet"
    assert tuple(ckpt["datamodule_hyper_parameters"]["ct_window"]) == (-16.0, 176.0)
    assert (tiny_run / "checkpoints" / "best.ckpt").is_file()
    metrics = _metrics(tiny_run)
    expected = (
        "train/loss_epoch", "train/loss_ct_epoch", "train/loss_mri_epoch", "train/dice_mean_epoch", "val/dice_mean",
        "val/dice_ct_liver", "val/dice_ct_tumor", "val/dice_mri_liver", "val/dice_mri_tumor",
        "gates/stage1/mri_to_ct_epoch", "lr-AdamW",
    )
    for key in expected:
        assert key in metrics, key
    mean = (metrics["val/dice_ct_liver"] + metrics["val/dice_ct_tumor"] + metrics["val/dice_mri_liver"]
            + metrics["val/dice_mri_tumor"]) / 4
    assert metrics["val/dice_mean"] == pytest.approx(mean, abs=1e-5)
    assert 0.0 <= metrics["gates/stage1/mri_to_ct_epoch"] <= 1.0
    assert metrics["lr-AdamW"] == pytest.approx(1e-4)
    assert sorted(p.name for p in (tiny_run / "overlays").glob("*.png")) == ["epoch000_ct.png", "epoch000_mri.png"]


def test_loaded_checkpoint_rebuilds_network(tiny_run):
    from aqcf.models.segmentation import SegmentationModule

    module = SegmentationModule.load_from_checkpoint(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu")
    assert type(module.network).__name__ == "AQCFNet"
    x = torch.rand(1, 1, 32, 32, 16)
    assert module.network.forward_single(x, "mri").shape == (1, 3, 32, 32, 16)


def test_resume_continues_step_count(tiny_phantoms, tiny_run, tmp_path):
    root = tmp_path / "resume"
    (root / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "best.ckpt"):
        (root / "checkpoints" / name).write_bytes((tiny_run / "checkpoints" / name).read_bytes())
    args = tiny_fit_args(tiny_phantoms, root, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert main(["fit", *args]) == 0
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert ckpt["epoch"] == 1
    assert "optimizer_states" in ckpt and ckpt["lr_schedulers"]


def test_fit_refuses_to_overwrite_checkpoints(tiny_phantoms, tiny_run, capsys):
    assert main(["fit", *tiny_fit_args(tiny_phantoms, tiny_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints" in err[0] and "--ckpt_path last" in err[0]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--data.fold", "7"], "data.fold 7"),
        (["--model.network.init_args.gate", "sometimes"], "gate"),
        (["--ckpt_path", "missing.ckpt"], "missing.ckpt"),
        (["--trainer.max_epochs", "many"], "max_epochs"),
    ],
)
def test_bad_config_values_give_one_line(tiny_phantoms, tmp_path, capsys, extra, expected):
    with pytest.raises(SystemExit) if extra[0] == "--trainer.max_epochs" else _no_raise():
        code = main(["fit", *tiny_fit_args(tiny_phantoms, tmp_path / "bad", *extra)])
        assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("aqcf: error:")]
    assert len(err) == 1 and expected in err[0]


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_test_writes_per_case_metrics(tiny_phantoms, tiny_run):
    args = tiny_fit_args(tiny_phantoms, tiny_run, "--ckpt_path", str(tiny_run / "checkpoints" / "best.ckpt"))
    assert main(["test", *args]) == 0
    summary = json.loads((tiny_run / "test" / "summary.json").read_text())
    rows = list(csv.DictReader(open(tiny_run / "test" / "metrics.csv")))
    modalities = {row["modality"] for row in rows}
    assert modalities == {"ct", "mri"}
    # fold 0 of six cases per cohort holds two; limit_test_batches 4 keeps them all
    assert len({(r["modality"], r["case"]) for r in rows}) == 4
    assert set(summary["per_modality"]) == {"ct", "mri"}
    assert set(summary["per_modality"]["ct"]) == {"liver", "tumor"}


def test_run_settings_given_beside_a_checkpoint_win_over_the_checkpoints(tiny_phantoms, tiny_run, tmp_path,
                                                                         monkeypatch):
    from aqcf.cli.lightning import AqcfCLI

    best = tiny_run / "checkpoints" / "best.ckpt"
    saved = torch.load(best, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert saved["sw_overlap"] == 0.25 and saved["network"]["init_args"]["absent_context"] == "zero-filled"
    built = []
    instantiate = AqcfCLI.instantiate_classes

    def keep_model(cli):
        instantiate(cli)
        built.append(cli.model)

    monkeypatch.setattr(AqcfCLI, "instantiate_classes", keep_model)

    # on the command line
    out = tmp_path / "cli"
    assert main(["test", *tiny_fit_args(tiny_phantoms, tiny_run, "--ckpt_path", str(best),
                                        "--model.test_output", str(out), "--model.sw_overlap", "0.5",
                                        "--model.network.init_args.absent_context", "off")]) == 0
    assert json.loads((out / "summary.json").read_text())["source"]["sliding_window"]["overlap"] == 0.5
    assert built[-1].network.absent_context == "off" and built[-1].sw_overlap == 0.5
    assert not (tiny_run / "test" / "cli").exists()

    # in a --config layer
    out = tmp_path / "layer"
    layer = tmp_path / "layer.yaml"
    layer.write_text(f"model:\n  sw_overlap: 0.6\n  test_output: {out}\n")
    assert main(["test", *tiny_fit_args(tiny_phantoms, tiny_run, "--ckpt_path", str(best)),
                 "--config", str(layer)]) == 0
    assert json.loads((out / "summary.json").read_text())["source"]["sliding_window"]["overlap"] == 0.6
    assert built[-1].network.absent_context == "zero-filled"

    # what the trained weights need still comes from the checkpoint, whatever the command line says
    widths = list(saved["network"]["init_args"]["widths"])
    out = tmp_path / "widths"
    assert main(["test", *tiny_fit_args(tiny_phantoms, tiny_run, "--ckpt_path", str(best),
                                        "--model.test_output", str(out),
                                        "--model.network.init_args.widths", str([2 * w for w in widths]))]) == 0
    assert list(built[-1].network.widths) == widths


def _subprocess_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def test_wandb_without_key_goes_offline_and_logs(tiny_phantoms, tmp_path):
    """No API key and no WANDB_MODE: one message, then an offline W&B run folder with the metrics."""
    home = tmp_path / "home"
    home.mkdir()
    root = tmp_path / "wandb_run"
    cmd = [sys.executable, "-m", "aqcf.cli", "fit", *tiny_fit_args(tiny_phantoms, root)]
    done = subprocess.run(cmd, env=_subprocess_env(HOME=str(home)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no API key" in done.stderr and "offline" in done.stderr
    runs = list(root.glob("wandb/offline-run-*/run-*.wandb"))
    assert runs, list(root.glob("**/*"))
    blob = runs[0].read_bytes()
    assert b"val/dice_mean" in blob and b"train/loss_epoch" in blob


def test_each_verb_in_one_process_logs_its_own_wandb_run(tiny_phantoms, tmp_path, monkeypatch):
    """A fit, then another fit of another fold in the same process (aqcf demo, a notebook, a fold loop)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # W&B's own settings files, out of the user's home
    roots = [tmp_path / "fold0", tmp_path / "fold1"]
    for fold, root in enumerate(roots):
        assert main(["fit", *tiny_fit_args(tiny_phantoms, root, "--data.fold", str(fold))]) == 0
        assert wandb.run is None  # closed when the verb returned
    runs = [sorted(root.glob("wandb/offline-run-*/run-*.wandb")) for root in roots]
    assert [len(r) for r in runs] == [1, 1], runs
    assert runs[0][0].name != runs[1][0].name  # two runs, not the first one reused
    for found in runs:
        assert b"val/dice_mean" in found[0].read_bytes()


def run_on_cpus(verb: str, phantoms: Path, ckpt: Path, root: Path, devices: int, *extra: str) -> None:
    """``aqcf <verb>`` of ``ckpt`` into ``root`` in a subprocess of ``devices`` CPU processes (DDP over gloo)."""
    args = tiny_fit_args(
        phantoms, root, "--ckpt_path", str(ckpt), "--trainer.devices", str(devices),
        "--trainer.strategy", "ddp" if devices > 1 else "auto", *extra,
    )
    cmd = [sys.executable, "-m", "aqcf.cli", verb, *args]
    done = subprocess.run(cmd, env=_subprocess_env(WANDB_MODE="disabled"), capture_output=True, text=True,
                          timeout=600, cwd=root.parent)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_ddp_two_processes_reduce_validation(tiny_phantoms, tiny_run, tmp_path):
    """Validation under DDP (gloo, 2 CPU processes) gives the same pooled Dice as one process."""
    best = tiny_run / "checkpoints" / "best.ckpt"
    results = {}
    for devices in (1, 2):
        root = tmp_path / f"ddp{devices}"
        run_on_cpus("validate", tiny_phantoms, best, root, devices, "--trainer.limit_val_batches", "1.0")
        results[devices] = _metrics(root)
    for key in ("val/dice_ct_liver", "val/dice_mri_tumor", "val/dice_mean"):
        assert results[2][key] == pytest.approx(results[1][key], abs=1e-5), key


def test_demo_pipeline_end_to_end(tmp_path):
    """`aqcf demo` with configs/demo.yaml (made tiny): phantoms, fit, held-out test, report with pictures."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n-ct", "5", "--n-mri", "5", "--shape", "48", "48", "24",
            "--fit-args", f"--config {REPO / 'tests' / 'configs' / 'tiny_cpu.yaml'}"]
    assert main(args) == 0
    assert (out / "phantoms" / "LiTS" / "volume-0.nii").is_file()
    assert (out / "phantoms" / "ATLAS" / "imagesTr" / "im0.nii.gz").is_file()
    summary = json.loads((out / "run" / "test" / "summary.json").read_text())
    assert set(summary["per_modality"]) == {"ct", "mri"}
    report = (out / "report.md").read_text()
    assert "| CT | tumor |" in report and "| MRI | liver |" in report
    assert (out / "curves.png").is_file()
    assert len(list((out / "run" / "test" / "overlays").glob("*.png"))) == 2  # one held-out case per modality
    # a second call reuses everything and only rewrites the report
    mtime = (out / "run" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "run" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == mtime
