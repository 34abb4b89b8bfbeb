"""Checkpoints: the gate of every verb that takes one, temporary files of killed writes, exact resumption
after kills (a finished run stays finished), and a full disk while saving."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

from aqcf.cli import main
from aqcf.errors import AqcfError
from aqcf.training import checkpoint_io
from aqcf.training.checkpoint_io import check_checkpoint
from tests.conftest import tiny_fit_args
from tests.test_outputs import one_error, run, sha256


def _damaged(kind: str, folder: Path, good: Path) -> tuple[Path, str]:
    """A damaged checkpoint made from ``good`` and the message it must give."""
    path = folder / f"{kind}.ckpt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, f"{path}: truncated or corrupt checkpoint"
    if kind == "garbage":
        path.write_bytes(b"PK\x03\x04 this is no checkpoint " * 100)
        return path, f"{path}: truncated or corrupt checkpoint"
    if kind == "tensor":
        torch.save(torch.zeros(3), path)
        return path, f"{path}: not an aqcf checkpoint"
    if kind == "dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 1e-3}}, path)
        return path, f"{path}: not an aqcf checkpoint"
    raise AssertionError(kind)


DAMAGES = ["truncated", "garbage", "tensor", "dict"]


def test_gate_messages(tiny_run, tmp_path):
    good = tiny_run / "checkpoints" / "best.ckpt"
    assert "state_dict" in check_checkpoint(good, resume=True)
    with pytest.raises(AqcfError, match="checkpoint not found"):
        check_checkpoint(tmp_path / "absent.ckpt")
    for kind in DAMAGES:
        path, message = _damaged(kind, tmp_path, good)
        with pytest.raises(AqcfError, match=message.replace(str(path), ".*")):
            check_checkpoint(path)
    weights = torch.load(good, map_location="cpu", weights_only=False)
    for key in ("loops", "optimizer_states"):
        weights.pop(key)
    torch.save(weights, tmp_path / "weights.ckpt")
    check_checkpoint(tmp_path / "weights.ckpt")  # enough to test or segment with
    with pytest.raises(AqcfError, match="weights only"):
        check_checkpoint(tmp_path / "weights.ckpt", resume=True)


def _argv(verb: str, ckpt: Path, phantoms: Path, tmp: Path) -> list[str]:
    if verb == "segment":
        return ["segment", str(phantoms / "LiTS" / "volume-0.nii"), "--modality", "ct", "--ckpt", str(ckpt),
                "--out", str(tmp / "masks"), "--no-progress"]
    if verb == "explain":
        return ["explain", "--ckpt", str(ckpt), "--out", str(tmp / "explained"), "--no-progress"]
    return [verb, *tiny_fit_args(phantoms, tmp / "run", "--ckpt_path", str(ckpt))]


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("verb", ["fit", "validate", "test", "predict", "segment", "explain"])
def test_every_verb_refuses_a_damaged_checkpoint(verb, kind, tiny_phantoms, tiny_run, tmp_path, capsys):
    path, message = _damaged(kind, tmp_path, tiny_run / "checkpoints" / "best.ckpt")
    before = sha256(tmp_path)
    one_error(*run(_argv(verb, path, tiny_phantoms, tmp_path), capsys), message)
    assert sha256(tmp_path) == before  # the checkpoint is untouched and nothing was written


def _copy_run(tiny_run: Path, root: Path) -> Path:
    (root / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "best.ckpt"):
        shutil.copyfile(tiny_run / "checkpoints" / name, root / "checkpoints" / name)
    return root / "checkpoints"


def test_truncated_last_checkpoint_is_one_line(tiny_phantoms, tiny_run, tmp_path, capsys):
    checkpoints = _copy_run(tiny_run, tmp_path / "run")
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    before = sha256(tmp_path)
    argv = ["fit", *tiny_fit_args(tiny_phantoms, tmp_path / "run", "--ckpt_path", "last")]
    one_error(*run(argv, capsys), f"{last}: truncated or corrupt checkpoint")
    assert sha256(tmp_path) == before


def test_fit_removes_temporaries_of_killed_writes(tiny_phantoms, tiny_run, tmp_path, capsys):
    checkpoints = _copy_run(tiny_run, tmp_path / "run")
    # what a kill during a checkpoint write leaves: aqcf.io.atomic_path's temporary files
    stale = [checkpoints / ".last.ckpt.k3j_x9.tmp", checkpoints / ".best.ckpt.0a1b2c.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    keep = checkpoints / ".notes.txt.tmp"  # not a checkpoint's: left alone
    keep.write_text("mine")
    before = sha256(checkpoints / "last.ckpt", checkpoints / "best.ckpt")
    assert main(["fit", *tiny_fit_args(tiny_phantoms, tmp_path / "run", "--ckpt_path", "last")]) == 0
    printed = capsys.readouterr()
    assert f"removed 2 temporary file(s) of interrupted checkpoint writes from {checkpoints}" in printed.err
    assert not any(p.exists() for p in stale) and keep.exists()
    assert sha256(checkpoints / "last.ckpt", checkpoints / "best.ckpt") == before  # the finished run: no training


# ----------------------------------------------------------------------------------------- exact resume
class _Killed(RuntimeError):
    """Stands for a kill during a checkpoint write: the file is not written, the process ends."""


@pytest.mark.parametrize(
    "limits, kill_steps, final_step",
    [
        # 2 training batches per epoch (tests/configs/tiny_cpu.yaml), 4 epochs: 8 steps. The save after step 5
        # is killed, so the run resumes from last.ckpt of step 4, written after the last batch of epoch 1
        # and before its end (Lightning 2.x resumed such a checkpoint into a state that, resumed again
        # once finished, trained one more epoch); a second kill at step 7.
        (["--trainer.max_epochs", "4"], (5, 7), 8),
        (["--trainer.max_epochs", "-1", "--trainer.max_steps", "7"], (5,), 7),
    ],
)
def test_resume_after_kills_ends_at_the_configured_step(limits, kill_steps, final_step, tiny_phantoms, tmp_path,
                                                        monkeypatch, capsys):
    root = tmp_path / "run"
    extra = [*limits, "--checkpoint.every_n_train_steps", "1", "--trainer.limit_val_batches", "1",
             "--overlays.save_png", "false", "--trainer.num_sanity_val_steps", "0"]
    save = checkpoint_io.AtomicCheckpointIO.save_checkpoint
    pending = set(kill_steps)

    def killing_save(self, checkpoint, path, storage_options=None):
        if checkpoint["global_step"] in pending:
            pending.discard(checkpoint["global_step"])
            raise _Killed(f"killed while writing {path}")
        return save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(checkpoint_io.AtomicCheckpointIO, "save_checkpoint", killing_save)
    last = root / "checkpoints" / "last.ckpt"
    resume: list[str] = []
    for _ in range(len(kill_steps) + 1):
        try:
            assert run(["fit", *tiny_fit_args(tiny_phantoms, root, *extra, *resume)], capsys)[0] == 0
            break
        except _Killed:
            resume = ["--ckpt_path", "last"]
    assert not pending  # every kill happened
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == final_step

    # resuming the finished run trains nothing and says so
    before = sha256(root / "checkpoints")
    capsys.readouterr()
    assert main(["fit", *tiny_fit_args(tiny_phantoms, root, *extra, "--ckpt_path", "last")]) == 0
    assert f"{last}: the run is finished" in capsys.readouterr().out
    assert sha256(root / "checkpoints") == before
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == final_step


def test_loop_state_after_an_epochs_last_batch_becomes_its_end():
    def counters(ready, started, processed, completed):
        return {"ready": ready, "started": started, "processed": processed, "completed": completed}

    # as saved by ModelCheckpoint.on_train_batch_end after batch 4 of 4 of the second epoch
    checkpoint = {"global_step": 8, "loops": {"fit_loop": {
        "epoch_progress": {"total": counters(2, 2, 1, 1), "current": counters(2, 2, 1, 1)},
        "epoch_loop.batch_progress": {"total": counters(8, 8, 8, 7), "current": counters(4, 4, 4, 3),
                                      "is_last_batch": True},
        "epoch_loop.state_dict": {"_batches_that_stepped": 7},
    }}}
    assert checkpoint_io.normalise_loop_state(checkpoint)
    fit_loop = checkpoint["loops"]["fit_loop"]
    assert fit_loop["epoch_progress"]["current"] == counters(2, 2, 2, 1)  # as in on_train_epoch_end
    assert fit_loop["epoch_loop.batch_progress"]["current"] == counters(4, 4, 4, 4)
    assert fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] == 8
    assert checkpoint_io.finished_reason(checkpoint, max_steps=-1, max_epochs=2) is not None
    assert checkpoint_io.finished_reason(checkpoint, max_steps=-1, max_epochs=3) is None
    assert not checkpoint_io.normalise_loop_state(checkpoint)  # once only
    # mid-epoch (not the last batch): left to Lightning
    fit_loop["epoch_loop.batch_progress"] = {"total": counters(7, 7, 7, 6), "current": counters(3, 3, 3, 2),
                                             "is_last_batch": False}
    fit_loop["epoch_progress"] = {"total": counters(2, 2, 1, 1), "current": counters(2, 2, 1, 1)}
    assert not checkpoint_io.normalise_loop_state(checkpoint)


# ------------------------------------------------------------------------------------------- full disk
def test_full_disk_while_saving_a_checkpoint(tiny_phantoms, tiny_run, tmp_path, monkeypatch, capsys):
    checkpoints = _copy_run(tiny_run, tmp_path / "run")
    before = sha256(checkpoints)

    def full_disk(self, data):  # what write() does on a full disk: an OSError naming no file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    argv = ["fit", *tiny_fit_args(tiny_phantoms, tmp_path / "run", "--trainer.max_epochs", "2", "--ckpt_path", "last",
                                  "--overlays.save_png", "false")]
    line = one_error(*run(argv, capsys), "No space left on device")
    assert f"{checkpoints}/" in line and line.split(": ")[2].endswith(".ckpt")  # names the checkpoint
    monkeypatch.undo()
    assert sha256(checkpoints) == before  # the earlier checkpoints intact, no temporary file left
