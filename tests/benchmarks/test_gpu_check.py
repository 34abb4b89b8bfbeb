"""benchmarks/gpu_check.sh end to end on the CPU with a tiny network: the script a GPU node runs first."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_CONFIG


@pytest.mark.slow
def test_gpu_check_script_trains_tests_and_profiles(tmp_path):
    out = tmp_path / "check"
    aqcf = Path(sys.executable).with_name("aqcf")
    env = os.environ | {"AQCF": str(aqcf), "EXTRA": f"--config {TINY_CONFIG} --step_timer.skip_first 0",
                        "WANDB_MODE": "disabled",
                        "PYTHON": sys.executable, "SKIP_COMPILE": "1", "SKIP_BENCH": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[gpu_check] synth" in done.stdout
    # the step timer's line for the eager fit: steps/s and the data-wait share
    assert "[gpu_check] eager: epoch 0:" in done.stdout and "waiting for data" in done.stdout
    # the profile counts the training batches: max_steps 2
    profile = (out / "fit-fit_profile.txt").read_text()
    batches = next(line for line in profile.splitlines() if "run_training_batch" in line)
    assert int(batches.split("|")[3]) == 2
    # the test of best.ckpt scored both modalities
    with open(out / "run" / "test" / "metrics.csv") as f:
        modalities = {row["modality"] for row in csv.DictReader(f)}
    assert modalities == {"ct", "mri"}
