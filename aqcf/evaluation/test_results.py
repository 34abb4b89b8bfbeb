"""``aqcf test``: a Lightning callback writing the per-case metrics and overlays of the held-out cases.

``SegmentationModule.test_step`` returns, per volume of the test loader, the case's image, reference and
predicted label maps on the preprocessed grid with its voxel spacing. :class:`TestResultsWriter` scores each
case with :func:`aqcf.evaluation.metrics.evaluate_case` (the rows ``aqcf evaluate`` writes), draws the first
``model.test_overlays`` cases of each modality, and after the last case writes, on global rank zero, the
rows of every rank with :func:`aqcf.evaluation.evaluate.write_results`:

* ``<test_output>/metrics.csv`` and ``<test_output>/summary.json`` (``source``: the checkpoint and the
  validation protocol that selected it, :meth:`SegmentationModule.test_info`);
* ``<test_output>/overlays/<modality>_<case id>.png``.

``test_output`` is the model's setting (``--model.test_output``), default ``<trainer.default_root_dir>/test``.
``aqcf`` attaches the callback to every LightningCLI run; it acts only in ``test``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from aqcf.evaluation.evaluate import write_results
from aqcf.evaluation.metrics import evaluate_case

__all__ = ["TEST_DIR", "TestResultsWriter", "results_folder"]

TEST_DIR = "test"


def results_folder(test_output: str | None, root: str | os.PathLike) -> Path:
    """Where ``aqcf test`` writes: the model's ``test_output``, else ``<root>/test``."""
    return Path(test_output or os.path.join(root, TEST_DIR))


class TestResultsWriter(L.Callback):
    """Score each test case, draw a few, and write ``metrics.csv`` and ``summary.json`` after the last.

    Its settings are the model's ``test_output`` and ``test_overlays`` (hyper-parameters of the
    checkpoints that carry them), read when the test runs.
    """

    __test__ = False  # a class named Test* is not a pytest test class

    def __init__(self) -> None:
        self._rows: list[dict] = []
        self._overlays_drawn: dict[str, int] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []
        self._overlays_drawn = {}

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: dict[str, Any] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if outputs is None:  # a modality the model does not serve
            return
        self._rows += evaluate_case(
            outputs["prediction"],
            outputs["label"],
            spacing=outputs["spacing"],
            case=outputs["id"],
            modality=outputs["modality"],
        )
        self._draw(trainer, pl_module, outputs)

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, case: dict[str, Any]) -> None:
        """The overlay of ``case``, while its modality has fewer than ``test_overlays`` drawn."""
        modality, case_id = case["modality"], case["id"]
        if self._overlays_drawn.get(modality, 0) >= pl_module.test_overlays:
            return
        from aqcf.visualize.overlays import save_overlay_png

        self._overlays_drawn[modality] = self._overlays_drawn.get(modality, 0) + 1
        save_overlay_png(
            results_folder(pl_module.test_output, trainer.default_root_dir) / "overlays" / f"{modality}_{case_id}.png",
            case["image"],
            {"ground truth": case["label"], "prediction": case["prediction"]},
            title=f"{modality.upper()} {case_id} (held out)",
        )

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self._rows
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[dict]] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if trainer.is_global_zero and rows:
            folder = results_folder(pl_module.test_output, trainer.default_root_dir)
            write_results(rows, folder, overwrite=True, info=pl_module.test_info())
