"""Where the training time goes: steps per second and the share of it spent waiting for data.

Lightning fetches a batch, then calls ``on_train_batch_start``, runs the step, then
``on_train_batch_end``. The time from one batch's end to the next batch's start is the loop waiting for
the data (the two TorchIO queues, their workers, augmentation, collation); the time from start to end is
the step. On a GPU the step is queued asynchronously, so a step's end is only known when a later
operation waits for it (the loss logged each step does): the split between the two is then approximate
but their sum, and so the steps per second, is exact.
"""

from __future__ import annotations

import time

import lightning as L
import torch

__all__ = ["StepTimer"]


class StepTimer(L.Callback):
    """Log ``perf/steps_per_s``, ``perf/step_s`` and ``perf/data_wait_fraction`` per training epoch.

    Also prints one line per epoch on rank 0, e.g. ``epoch 3: 5.21 steps/s, step 0.150 s, waiting for
    data 22% of the time (raise --data.num_workers)``; the hint appears when the wait is above
    ``hint_above``. The first ``skip_first`` steps of each epoch (queue filling, compilation) are left
    out.

    Args:
        skip_first: Steps at the start of each epoch left out of the figures.
        hint_above: Data-wait fraction above which the printed line suggests more workers.
        verbose: Print the line (the values are logged either way).
    """

    def __init__(self, skip_first: int = 2, hint_above: float = 0.05, verbose: bool = True) -> None:
        self.skip_first = max(0, int(skip_first))
        self.hint_above = float(hint_above)
        self.verbose = verbose
        self._reset()

    def _reset(self) -> None:
        self._steps = 0
        self._seen = 0
        self._wait = 0.0
        self._compute = 0.0
        self._last_end: float | None = None
        self._start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset()
        self._last_end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._seen += 1
        if self._seen > self.skip_first and self._last_end is not None:
            self._wait += now - self._last_end
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._seen > self.skip_first and self._start is not None:
            self._compute += now - self._start
            self._steps += 1
        self._last_end = now

    def summary(self) -> dict[str, float] | None:
        """The current epoch's figures, or None before any timed step."""
        total = self._wait + self._compute
        if self._steps == 0 or total <= 0:
            return None
        return {
            "perf/steps_per_s": self._steps / total,
            "perf/step_s": self._compute / self._steps,
            "perf/data_wait_fraction": self._wait / total,
        }

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        values = self.summary()
        if values is None:
            return
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        if self.verbose and trainer.is_global_zero:
            wait = values["perf/data_wait_fraction"]
            hint = " (raise --data.num_workers)" if wait > self.hint_above else ""
            print(
                f"epoch {trainer.current_epoch}: {values['perf/steps_per_s']:.2f} steps/s, step "
                f"{values['perf/step_s']:.3f} s, waiting for data {100 * wait:.0f}% of the time{hint}",
                flush=True,
            )
