"""One error contract for every verb of ``aqcf``: a bad flag, a missing input file or a bad value end with exactly
one ``aqcf: error:`` line on stderr and exit code 2, never a traceback; bugs keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401 - imported at collection, so its log handler holds no test's captured stderr
import pytest

import aqcf.cli as cli_module
from aqcf.cli import LIGHTNING_VERBS, VERBS, main
from tests.conftest import REPO, TINY_CONFIG, tiny_fit_args
from tests.test_outputs import one_error, run

ALL_VERBS = sorted([*VERBS, *LIGHTNING_VERBS])
# verbs whose parser is not yet aqcf.cli.ArgumentParser (plain argparse prints its usage before the error)
PLAIN_ARGPARSE: dict[str, str] = {}  # verbs whose parser does not yet print the one-line error


def _missing_input(verb: str, tmp: Path, phantoms: Path) -> tuple[list[str], str]:
    """Arguments naming an input that does not exist, and the name the error must show.

    ``synth`` and ``summary`` read no file: a bad value stands in.
    """
    missing = str(tmp / "absent")
    table = {
        "summary": (["--widths", "2", "0", "4"], "widths=(2, 0, 4)"),
        "synth": (["--out", str(tmp / "cohorts"), "--n-ct", "-1"], "negative"),
        "demo": (["--config", f"{missing}.yaml", "--out", str(tmp / "demo")], missing),
        "preprocess": (["--data", missing, "--format", "lits", "--modality", "ct", "--cache", str(tmp / "c")],
                       missing),
        "figures": (["qualitative", "--image", f"{missing}.nii", "--gt", f"{missing}.nii", "--out",
                     str(tmp / "f.png")], missing),
        "reader-stats": ([f"{missing}.csv"], missing),
        "evaluate": (["--pred", missing, "--ref", str(phantoms / "LiTS"), "--ref-format", "lits",
                      "--out", str(tmp / "eval"), "--no-progress"], missing),
        "report": ([missing, "--out", str(tmp / "report")], missing),
        "export-nnunet": ([missing, "--format", "lits", "--modality", "ct", "--id", "1", "--name", "X",
                           "--out", str(tmp / "raw")], missing),
        "segment": ([str(phantoms / "LiTS" / "volume-0.nii"), "--modality", "ct", "--ckpt", f"{missing}.ckpt",
                     "--out", str(tmp / "masks")], missing),
        "explain": (["--ckpt", f"{missing}.ckpt", "--out", str(tmp / "explained")], missing),
        "export": (["--ckpt", f"{missing}.ckpt", "--format", "torchscript", "--modality", "ct", "--out",
                    str(tmp / "model.pt")], missing),
    }
    if verb in LIGHTNING_VERBS:
        return [verb, *tiny_fit_args(phantoms, tmp / "run", "--ckpt_path", f"{missing}.ckpt")], missing
    args, name = table[verb]
    return [verb, *args], name


def test_every_verb_is_covered(tmp_path):
    """A new verb needs its entry in :func:`_missing_input` (and, if it writes, in tests/test_outputs.py)."""
    for verb in ALL_VERBS:
        assert _missing_input(verb, tmp_path, tmp_path)[0][0] == verb


@pytest.mark.parametrize(
    "verb",
    [pytest.param(v, marks=pytest.mark.xfail(reason=PLAIN_ARGPARSE[v], strict=True)) if v in PLAIN_ARGPARSE else v
     for v in ALL_VERBS],
)
def test_bad_flag(verb, capsys):
    one_error(*run([verb, "--no-such-flag"], capsys))


@pytest.mark.parametrize("verb", ALL_VERBS)
def test_missing_input(verb, tmp_path, tiny_phantoms, capsys):
    argv, name = _missing_input(verb, tmp_path, tiny_phantoms)
    one_error(*run(argv, capsys), name)


def test_lightning_verbs_missing_config(tmp_path, capsys):
    for verb in LIGHTNING_VERBS:
        one_error(*run([verb, "--config", str(tmp_path / "absent.yaml")], capsys), "absent.yaml")


def test_unknown_verb(capsys):
    one_error(*run(["segmnet", "scan.nii"], capsys), "unknown verb 'segmnet'")


def test_os_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys):
    import aqcf.visualize.figures as figures_verb

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/runs/fold0/metrics.csv")

    monkeypatch.setattr(figures_verb, "find_metrics_files", denied)
    argv = ["figures", "curves", str(tmp_path), "--out", str(tmp_path / "c.png")]
    one_error(*run(argv, capsys), "/data/runs/fold0/metrics.csv: Permission denied")

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(figures_verb, "find_metrics_files", bug)
    with pytest.raises(ZeroDivisionError):
        main(argv)
    assert "bug in aqcf and keeps its traceback" in cli_module.__doc__  # the policy, documented


def test_a_real_process_prints_one_line(tiny_phantoms, tmp_path):
    """What a shell sees (no pytest capture): one stderr line for a corrupt checkpoint given to `aqcf fit`."""
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(4096))
    args = tiny_fit_args(tiny_phantoms, tmp_path / "run", "--ckpt_path", str(garbage), config=None)
    assert str(TINY_CONFIG) in args
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "aqcf.cli", "fit", *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [f"aqcf: error: {garbage}: truncated or corrupt checkpoint (not a readable "
                                        "checkpoint: no complete zip archive)"]
    assert not (tmp_path / "run").exists()
