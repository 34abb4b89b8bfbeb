"""Shared test settings and fixtures: no network for W&B, few threads, tiny phantom cohorts and runs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory) -> Path:
    """Six CT (LiTS layout) and six MRI (ATLAS layout) phantoms of 48x48x24 voxels."""
    from aqcf.data.phantoms import ct_config, mri_config, synthesize

    out = tmp_path_factory.mktemp("phantoms")
    synthesize(out, n_ct=6, n_mri=6, ct=ct_config(shape=(48, 48, 24)), mri=mri_config(shape=(48, 48, 24)),
               seed=1, progress=False)
    return out


def tiny_fit_args(phantoms: Path, root: Path, *extra: str, config: Path | None = None) -> list[str]:
    """Arguments for ``aqcf fit`` of a shipped config on tiny phantoms with a tiny network on the CPU."""
    return [
        "--config", str(config or REPO / "configs" / "lits_atlas.yaml"),
        "--config", str(TINY_CONFIG),
        "--data.ct_root", str(phantoms / "LiTS"),
        "--data.mri_root", str(phantoms / "ATLAS"),
        "--data.cache_dir", str(phantoms / "cache"),
        "--trainer.default_root_dir", str(root),
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_run(tiny_phantoms, tmp_path_factory) -> Path:
    """A run folder of ``configs/lits_atlas.yaml`` trained for two steps: holds checkpoints/best.ckpt."""
    from aqcf.cli import main

    root = tmp_path_factory.mktemp("run")
    assert main(["fit", *tiny_fit_args(tiny_phantoms, root)]) == 0
    return root
