"""Checkpoints: the gate every verb passes a checkpoint through, atomic writes, and exact resumption.

* :func:`check_checkpoint`: a missing, truncated or corrupt file, or one that is not an ``aqcf fit``
  checkpoint, is refused with one line before any work starts.
* :class:`AtomicCheckpointIO`: each checkpoint is written to a temporary name beside it and renamed
  into place, so a killed run (or a full disk: an ``OSError`` naming the checkpoint) keeps its previous
  ``last.ckpt``; :func:`remove_stale_checkpoint_temporaries` clears the temporary files a hard kill
  leaves behind.
* Exact resumption. A checkpoint written after the last training batch of an epoch (``every_n_train_steps``)
  but before the epoch's end holds loop counters that Lightning 2.x resumes wrongly: it starts the next
  epoch without counting it as started, so every later checkpoint looks like the end of an epoch and a
  resume from one of them repeats that epoch (a finished run trained one more epoch). On loading,
  :func:`normalise_loop_state` turns such counters into those of the end of that epoch, the state a
  checkpoint saved in ``on_train_epoch_end`` has, which Lightning resumes exactly. :func:`finished_reason`
  tells a run that has nothing left to train.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from aqcf.errors import AqcfError, first_line
from aqcf.io import remove_stale_temporaries, write_bytes_atomic

__all__ = [
    "AtomicCheckpointIO",
    "check_checkpoint",
    "finished_reason",
    "normalise_loop_state",
    "remove_stale_checkpoint_temporaries",
]

CHECKPOINT_PATTERN = "*.ckpt"


def check_checkpoint(path: str | Path, resume: bool = False) -> dict[str, Any]:
    """Open a checkpoint cheaply (memory-mapped, weights not read) and check that aqcf can use it.

    Args:
        path: the checkpoint file.
        resume: it is to be resumed by ``aqcf fit``: it must hold the training state too.

    Returns:
        The checkpoint (its tensors memory-mapped from the file).

    Raises:
        AqcfError: ``<path>: checkpoint not found``; ``<path>: truncated or corrupt checkpoint``;
            ``<path>: not an aqcf checkpoint`` (loadable, but no state_dict and hyper-parameters of
            :class:`~aqcf.models.segmentation.SegmentationModule`); for ``resume``, no training state.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise AqcfError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise AqcfError(f"{path}: checkpoint not found (no such file)")
    # torch.save writes a zip archive; a truncated one has lost its central directory at the end
    if not zipfile.is_zipfile(path):
        raise AqcfError(f"{path}: truncated or corrupt checkpoint (not a readable checkpoint: no complete zip archive)")
    try:
        # the project's own pickles (hyper-parameters hold config objects), hence weights_only=False
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch and pickle raise many types for a damaged archive
        reason = first_line(err)
        raise AqcfError(f"{path}: truncated or corrupt checkpoint (not a readable checkpoint: {reason})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not (isinstance(state, Mapping) and isinstance(hparams, Mapping) and "network" in hparams):
        raise AqcfError(f"{path}: not an aqcf checkpoint (no state_dict and hyper_parameters written by `aqcf fit`)")
    if resume and not ("loops" in checkpoint and "optimizer_states" in checkpoint):
        raise AqcfError(f"{path}: holds the weights only, not the training state that `aqcf fit --ckpt_path` resumes")
    return checkpoint


def _progress(checkpoint: Mapping, key: str) -> Mapping | None:
    loops = checkpoint.get("loops")
    fit_loop = loops.get("fit_loop") if isinstance(loops, Mapping) else None
    return fit_loop.get(key) if isinstance(fit_loop, Mapping) else None


def normalise_loop_state(checkpoint: dict[str, Any]) -> bool:
    """Rewrite loop counters saved after an epoch's last training batch as those of that epoch's end.

    The checkpoint was written by ``ModelCheckpoint.on_train_batch_end`` (``every_n_train_steps``) after
    the last batch of an epoch, before the epoch's validation and end; the rewritten counters are those
    of ``on_train_epoch_end``: the batch completed, the epoch processed (not yet completed). Resuming
    then starts the next epoch, as Lightning already does for such a checkpoint, with consistent
    counters. The epoch's validation is not run again, as before. Changes ``checkpoint`` in place.

    Returns:
        Whether the counters were rewritten.
    """
    epochs = _progress(checkpoint, "epoch_progress")
    batches = _progress(checkpoint, "epoch_loop.batch_progress")
    loop_state = _progress(checkpoint, "epoch_loop.state_dict")
    if not (isinstance(epochs, Mapping) and isinstance(batches, Mapping)):
        return False
    try:
        after_batch = all(
            b["ready"] == b["started"] == b["processed"] == b["completed"] + 1
            for b in (batches["total"], batches["current"])
        )
        in_epoch = all(
            e["ready"] == e["started"] == e["processed"] + 1 and e["completed"] == e["processed"]
            for e in (epochs["total"], epochs["current"])
        )
        last_batch = bool(batches["is_last_batch"])
    except (KeyError, TypeError):  # another Lightning's layout: leave it to Lightning
        return False
    if not (after_batch and in_epoch and last_batch):
        return False
    for counter in (batches["total"], batches["current"]):
        counter["completed"] += 1
    for counter in (epochs["total"], epochs["current"]):
        counter["processed"] += 1
    if isinstance(loop_state, dict) and "_batches_that_stepped" in loop_state:
        # Lightning counts the batch after on_train_batch_end; a resume from the batch end adds it itself
        loop_state["_batches_that_stepped"] += 1
    return True


def finished_reason(checkpoint: Mapping, max_steps: int | None, max_epochs: int | None) -> str | None:
    """Why a run resumed from ``checkpoint`` has nothing left to train, or None.

    Args:
        checkpoint: as loaded (after :func:`normalise_loop_state`).
        max_steps: the trainer's ``max_steps`` (-1 or None: no limit).
        max_epochs: the trainer's ``max_epochs`` (-1 or None: no limit).
    """
    step = int(checkpoint.get("global_step", 0))
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        return f"global step {step}, max_steps {max_steps}"
    epochs = _progress(checkpoint, "epoch_progress")
    try:
        done = int(epochs["current"]["processed"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    if max_epochs is not None and max_epochs >= 0 and done >= max_epochs:
        return f"{done} epochs done, max_epochs {max_epochs}, global step {step}"
    return None


def remove_stale_checkpoint_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.<name>.ckpt.*.tmp`` files of checkpoint writes that a kill interrupted; returns them."""
    return remove_stale_temporaries(folder, CHECKPOINT_PATTERN)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary name in the same folder, then renames it into place.

    A run killed while saving keeps its previous ``last.ckpt`` intact, so ``--ckpt_path last`` resumes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        """Serialise in memory, then write the bytes atomically (:func:`aqcf.io.write_bytes_atomic`).

        Written directly beside ``path``: Lightning's own writer stages local files in the system's
        temporary folder first, where a killed run would leave a second copy behind. A failed write (a
        full disk) raises an ``OSError`` naming ``path``; the previous checkpoint is kept.
        """
        import torch

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes_atomic(path, buffer.getbuffer())

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, with :func:`normalise_loop_state` applied (resumption is then exact)."""
        kwargs = {} if map_location is None else {"map_location": map_location}
        checkpoint = super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        if isinstance(checkpoint, dict):
            normalise_loop_state(checkpoint)
        return checkpoint
