"""The LightningModule: joint training on unpaired CT + MRI batches, deployed-path validation.

Training (section 3.3, eq. 12): every batch holds one CT patch and one MRI patch drawn independently;
both go through the dual-stream network in one forward pass and the loss is the unweighted sum of one
MONAI ``DiceCELoss`` per stream. A network of M named streams (``modalities=("ct", "mri", "t2")``)
trains the same way on one patch per cohort: ``forward_streams({name: image})``, M losses summed.

Validation and test run the path a user deploys (eq. 17): whole preprocessed volumes, one modality at
a time, MONAI sliding-window inference with Gaussian blending
(:func:`aqcf.networks.sliding_window.sliding_window_logits`, the predictor's), the absent stream zero-filled
by the network's ``forward_single``.

The module trains and evaluates; it writes no files. The test's per-case metrics and overlays are written by
:class:`aqcf.evaluation.test_results.TestResultsWriter` from what :meth:`SegmentationModule.test_step`
returns, the validation overlays by :class:`aqcf.training.callbacks.ValidationOverlays`, the masks of
``aqcf predict`` by :class:`aqcf.inference.writer.PredictionMaskWriter`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from monai.losses import DiceCELoss
from torch import Tensor, nn
from torchmetrics import Metric

from aqcf.constants import IMAGE, LABEL, MODALITIES, check_name, region_mask
from aqcf.errors import AqcfError
from aqcf.networks.sliding_window import WindowSettings, argmax_labels, sliding_window_logits

__all__ = ["SegmentationModule", "PooledDice", "class_masks", "MONITOR"]

#: the value checkpoints and the plateau schedule follow: mean validation Dice over CT/MRI x liver/tumor
MONITOR = "val/dice_mean"
CLASSES = ("liver", "tumor")


def class_masks(label: Tensor) -> Tensor:
    """Evaluation masks in the LiTS convention: liver = labels {1, 2} (tumor is inside the liver), tumor = 2.

    Args:
        label: integer label map (B, 1, X, Y, Z) or (B, X, Y, Z) with values in {0, 1, 2}.

    Returns:
        Boolean tensor (B, 2, X, Y, Z): channel 0 liver, channel 1 tumor.
    """
    if label.ndim == 5:
        label = label[:, 0]
    return torch.stack([region_mask(label, "liver"), region_mask(label, "tumor")], dim=1)


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5)


def _default_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    # the monitored value is a Dice (higher is better): halve the rate after 4 epochs without improvement,
    # which is PyTorch's patience=3 (it reduces once the bad epochs exceed the patience)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=3)


class SegmentationModule(L.LightningModule):
    """Wraps a two-stream segmentation network, the joint DiceCE loss, optimizer and schedule.

    The network must provide ``forward(ct, mri) -> (logits_ct, logits_mri)`` (with more than two streams,
    ``forward_streams({name: image}) -> {name: logits}``) and
    ``forward_single(x, modality) -> logits`` (see :class:`aqcf.networks.aqcfnet.AQCFNet`). A network that
    serves only some modalities (a unimodal baseline) says so with a ``modalities`` attribute; the loss and
    the validation then cover only those.

    Args:
        network: the segmentation network (a ``class_path`` object in YAML).
        loss: loss for one stream, called as ``loss(logits (B,C,X,Y,Z), label (B,1,X,Y,Z) int)``; default
            ``DiceCELoss(to_onehot_y=True, softmax=True)`` (eq. 12 sums one per stream, unweighted).
        optimizer: callable that builds the optimizer from the parameters; default AdamW(lr=1e-4,
            weight_decay=1e-5).
        scheduler: callable that builds the LR scheduler from the optimizer; default ReduceLROnPlateau
            (mode "max" on ``val/dice_mean``, factor 0.5, patience 3: the rate halves after the 4th
            epoch without improvement, as the paper says).
        patch_size: training patch (X, Y, Z) in voxels; also the sliding window (linked to the data).
        sw_overlap: sliding-window overlap of ``aqcf test`` and ``aqcf predict`` (the paper uses 0.8).
        val_overlap: sliding-window overlap of the validation inside ``fit`` (``None``: ``sw_overlap``).
            It only picks the checkpoint and drives the schedule, so it may be cheaper than the test's:
            with 256×256×16 windows, 0.5 needs 2.6–5.3 times fewer windows than 0.8 on LiTS-sized
            volumes (docs/training.md has the counts and the measured effect on the Dice).
        sw_batch_size: windows per forward pass in sliding-window inference.
        sw_mode: blending of overlapping windows ("gaussian" or "constant").
        stitch_on_cpu: keep the stitched whole-volume logits on the CPU so large volumes fit in GPU memory.
        test_output: where ``aqcf test`` writes per-case metrics; default ``<default_root_dir>/test``. Read
            by :class:`aqcf.evaluation.test_results.TestResultsWriter`, which writes them (this module
            writes no files).
        test_overlays: ``aqcf test`` also draws this many cases per modality (``<test_output>/overlays``),
            by the same writer.
        compile: compile the network with ``torch.compile`` (its ``forward`` and ``forward_single``; the
            weights and checkpoint keys are unchanged).
        compile_mode: ``torch.compile`` mode (``"reduce-overhead"`` uses CUDA graphs on a GPU).
        compile_backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` checks tracing alone).
        check_finite: stop training when the loss or the gradient norm is not finite, naming the step and
            the cases of the batch, before the optimizer step (so no checkpoint holds the damage).
    """

    def __init__(
        self,
        network: nn.Module,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        patch_size: Sequence[int] = (256, 256, 16),
        sw_overlap: float = WindowSettings.overlap,
        val_overlap: float | None = 0.5,
        sw_batch_size: int = WindowSettings.batch_size,
        sw_mode: str = WindowSettings.mode,
        stitch_on_cpu: bool = False,
        test_output: str | None = None,
        test_overlays: int = 4,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        given = _cli_given_hyperparameters()
        # Under LightningCLI the hyper-parameters are the config (network as class_path + init_args), so a
        # checkpoint rebuilds its own network; built by hand, modules are saved as weights only.
        self.save_hyperparameters(ignore=None if given else ["network", "loss"])
        self.network = network
        self.loss = loss if loss is not None else DiceCELoss(to_onehot_y=True, softmax=True)
        self.optimizer_factory: Callable = optimizer or _default_optimizer
        self.scheduler_factory: Callable = scheduler or _default_scheduler
        self.patch_size = tuple(int(p) for p in patch_size)
        self.sw_overlap = float(sw_overlap)
        self.val_overlap = self.sw_overlap if val_overlap is None else float(val_overlap)
        for name, value in (("sw_overlap", self.sw_overlap), ("val_overlap", self.val_overlap)):
            if not 0 <= value < 1:
                raise AqcfError(f"model.{name} {value}: need an overlap in [0, 1)")
        self.compile_options = {"mode": compile_mode, "backend": compile_backend} if compile else None
        self.check_finite = bool(check_finite)
        self._batch_ids: dict[str, list[str]] = {}
        self._trained_data: dict[str, Any] = {}
        self.sw_batch_size = int(sw_batch_size)
        self.sw_mode = sw_mode
        self.stitch_on_cpu = bool(stitch_on_cpu)
        self.test_output = test_output
        self.test_overlays = int(test_overlays)
        self.modalities = tuple(check_name(m) for m in getattr(network, "modalities", MODALITIES))
        self.val_dice = nn.ModuleDict({m: PooledDice() for m in self.modalities})
        self.test_dice = nn.ModuleDict({m: PooledDice() for m in self.modalities})
        #: first validation case per modality as numpy arrays (image, label, prediction), for overlays
        self.overlay_cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # ----------------------------------------------------------------------------------------- training
    def forward(self, *images: Tensor) -> tuple[Tensor, ...]:
        """``network(*images)``: one batch per stream in ``modalities`` order (``(ct, mri)`` for the pair)."""
        return self.network(*images)

    def setup(self, stage: str) -> None:
        """Before fitting: every stream of the network needs a training cohort of that name."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        cohorts = getattr(datamodule, "modalities", None)
        if stage != "fit" or cohorts is None:
            return
        missing = [m for m in self.modalities if m not in cohorts]
        if missing:
            raise AqcfError(
                f"the network's streams {', '.join(self.modalities)} need training cohorts of those names; "
                f"data has {', '.join(cohorts) or 'none'} (no cohort for {', '.join(missing)})"
            )

    def configure_model(self) -> None:
        """Compile the network once, when asked (Lightning calls this before training or evaluation)."""
        if self.compile_options is None or getattr(self.network, "_aqcf_compiled", False):
            return
        options = {k: v for k, v in self.compile_options.items() if v is not None}
        # Module.compile keeps the parameter names (no "_orig_mod." prefix): checkpoints stay portable.
        self.network.compile(**options)
        if hasattr(self.network, "forward_single"):
            self.network.forward_single = torch.compile(self.network.forward_single, **options)
        self.network._aqcf_compiled = True

    def predict_volume(self, image: Tensor, modality: str, overlap: float | None = None) -> Tensor:
        """Whole-volume logits (B, C, X, Y, Z) by sliding-window inference on the unimodal path (eq. 17).

        ``overlap`` defaults to ``sw_overlap`` (the test's); validation passes ``val_overlap``.
        """
        window = WindowSettings(
            roi_size=self.patch_size,
            overlap=self.sw_overlap if overlap is None else overlap,
            batch_size=self.sw_batch_size,
            mode=self.sw_mode,
            stitch_on_cpu=self.stitch_on_cpu,
        )
        # precision "32": no autocast of its own, so Lightning's (the trainer's precision) applies
        return sliding_window_logits(self.network, image, modality, window, device=image.device)

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        if self.modalities == MODALITIES:
            logits = dict(zip(MODALITIES, self.network(batch["ct"][IMAGE], batch["mri"][IMAGE]), strict=True))
        elif len(self.modalities) > 1 and hasattr(self.network, "forward_streams"):
            # M named streams in one joint pass (eq. 12 sums one loss per stream)
            logits = self.network.forward_streams({m: batch[m][IMAGE] for m in self.modalities})
        else:
            logits = {m: self.network.forward_single(batch[m][IMAGE], m) for m in self.modalities}
        losses = {m: self.loss(logits[m], batch[m][LABEL].long()) for m in self.modalities}
        loss = sum(losses.values())
        self._batch_ids = {m: list(batch[m].get("id", [])) for m in self.modalities}
        batch_size = batch[self.modalities[0]][IMAGE].shape[0]
        log = {f"train/loss_{m}": value.detach() for m, value in losses.items()}
        log["train/loss"] = loss.detach()
        dices = []
        for m in self.modalities:
            dices += list(_batch_dice(logits[m].detach(), batch[m][LABEL]))
        log["train/dice_mean"] = torch.stack(dices).mean()
        for key, gate in getattr(self.network, "last_gates", {}).items():
            log[f"gates/{key}"] = gate.float().mean()
        # sync_dist: under DDP the epoch means (losses, λ) cover every rank's batches, not rank 0's alone
        self.log_dict(log, prog_bar=False, on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop before a non-finite update reaches the weights (one reduction and one sync per step)."""
        # under fp16 a GradScaler skips overflowing steps itself: infinite gradients are expected there
        if not self.check_finite or str(self.trainer.precision) in ("16-mixed", "16", "16-true"):
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            cases = "; ".join(f"{m.upper()} {', '.join(ids)}" for m, ids in self._batch_ids.items())
            raise AqcfError(
                f"training step {self.global_step}: non-finite loss or gradient (batch: {cases}); stopped "
                "before the optimizer step, the checkpoints hold the last good weights"
            )

    # --------------------------------------------------------------------------------------- validation
    def _evaluate_volume(self, batch: dict[str, Any], stage: str) -> tuple[str, Tensor, Tensor]:
        modality = check_name(batch["modality"][0])
        if modality not in self.modalities:
            return modality, None, None
        logits = self.predict_volume(batch[IMAGE], modality, self.val_overlap if stage == "val" else None)
        label = batch[LABEL].long().to(logits.device)
        loss = self.loss(logits, label)
        self.log(f"{stage}/loss_{modality}", loss, batch_size=1, sync_dist=True)
        self.log(f"{stage}/loss", loss, batch_size=1, sync_dist=True)
        prediction = logits.argmax(dim=1, keepdim=True)
        metric = (self.val_dice if stage == "val" else self.test_dice)[modality]
        metric.update(class_masks(prediction), class_masks(label))
        return modality, prediction, label

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        modality, prediction, label = self._evaluate_volume(batch, "val")
        if prediction is not None and modality not in self.overlay_cases:
            self.overlay_cases[modality] = (
                batch[IMAGE][0, 0].float().cpu().numpy(),
                label[0, 0].cpu().numpy().astype(np.uint8),
                prediction[0, 0].cpu().numpy().astype(np.uint8),
            )

    def on_validation_epoch_start(self) -> None:
        self.overlay_cases = {}

    def on_validation_epoch_end(self) -> None:
        self._log_dice("val", self.val_dice)

    def _log_dice(self, stage: str, metrics: nn.ModuleDict) -> dict[str, float]:
        values = {}
        # Summed over ranks: a rank whose shard holds no volume of a modality must still join that
        # metric's reduction, or the ranks' collectives would pair up across modalities.
        counts = torch.tensor([float(m.update_count) for m in metrics.values()], device=self.device)
        if self._trainer is not None:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        for (modality, metric), count in zip(metrics.items(), counts.tolist(), strict=True):
            if count == 0:  # no volume of this modality on any rank (sanity check, limit_val_batches)
                metric.reset()
                continue
            dice = metric.compute().float()
            metric.reset()
            for name, value in zip(CLASSES, dice, strict=True):
                values[f"{stage}/dice_{modality}_{name}"] = torch.nan_to_num(value, nan=0.0)
        if not values:
            return {}
        values[f"{stage}/dice_mean"] = torch.stack(list(values.values())).mean()
        # already reduced across ranks by torchmetrics: no sync_dist here
        self.log_dict(values, prog_bar=stage == "val")
        return {k: float(v) for k, v in values.items()}

    # --------------------------------------------------------------------------------------------- test
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        """``aqcf test``: the pooled test Dice of one whole volume, and the case for the results writer.

        Returns:
            ``{"id", "modality", "spacing", "image", "label", "prediction"}`` with ``spacing`` the voxel
            size in mm and the three volumes (X, Y, Z) numpy arrays on the CPU (image float32, label and
            prediction int64), or None for a modality this model does not serve.
            :class:`aqcf.evaluation.test_results.TestResultsWriter` scores and draws them.
        """
        modality, prediction, label = self._evaluate_volume(batch, "test")
        if prediction is None:
            return None
        return {
            "id": batch["id"][0],
            "modality": modality,
            "spacing": tuple(float(s) for s in batch["spacing"][0]),
            "image": batch[IMAGE][0, 0].float().cpu().numpy(),
            "label": label[0, 0].cpu().numpy(),
            "prediction": prediction[0, 0].cpu().numpy(),
        }

    def on_test_epoch_end(self) -> None:
        self._log_dice("test", self.test_dice)

    def test_info(self) -> dict:
        """What produced the test results: the checkpoint, the validation protocol that selected it and
        the sliding window the cases were segmented with (``roi``, ``overlap``, ``mode``).

        Stored under ``"source"`` in ``summary.json`` by
        :class:`aqcf.evaluation.test_results.TestResultsWriter`; the checkpoint's own data settings are
        known here (:meth:`on_load_checkpoint`).
        """
        info = {"checkpoint": self.trainer.ckpt_path,
                "sliding_window": {"roi": list(self.patch_size), "overlap": self.sw_overlap, "mode": self.sw_mode}}
        datamodule = getattr(self.trainer, "datamodule", None)
        # the checkpoint's own data settings when it has them (they selected it), else this run's
        hparams = self._trained_data or dict(getattr(datamodule, "hparams", {}) or {})
        if hparams:
            # checkpoints written before the option existed validated on the held-out fold
            info["protocol"] = hparams.get("protocol", "heldout")
            info["fold"] = hparams.get("fold")
            if info["protocol"] == "inner":
                info["inner_folds"] = hparams.get("inner_folds")
        return info

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._trained_data = dict(checkpoint.get("datamodule_hyper_parameters") or {})

    # ------------------------------------------------------------------------------------------ predict
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        """``aqcf predict``: the label map of one whole volume on its preprocessed grid (deployed path).

        Returns:
            ``{"id", "modality", "record", "labels"}`` with ``labels`` a uint8 CPU tensor (X, Y, Z) and
            ``record`` the case's manifest entry (from the predict loader), or None for a modality this
            model does not serve. :class:`aqcf.inference.writer.PredictionMaskWriter` maps the labels back
            onto the source scan and writes them.
        """
        modality = check_name(batch["modality"][0])
        if modality not in self.modalities:
            return None
        logits = self.predict_volume(batch[IMAGE], modality)
        return {
            "id": batch["id"][0],
            "modality": modality,
            "record": batch.get("record", [None])[0],
            "labels": argmax_labels(logits),
        }

    # -------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        scheduler = self.scheduler_factory(optimizer)
        # the plateau schedule steps when a validation ran: every check_val_every_n_epoch epochs
        every = getattr(self.trainer, "check_val_every_n_epoch", None) if self._trainer is not None else None
        config = {"scheduler": scheduler, "interval": "epoch", "frequency": int(every or 1)}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = MONITOR
            config["strict"] = False  # no validation this epoch (limit_val_batches=0): skip the step
        return {"optimizer": optimizer, "lr_scheduler": config}


class PooledDice(Metric):
    """Dice per class pooled over every volume seen: ``2 Σ|P∩R| / (Σ|P| + Σ|R|)``, over all ranks.

    A tumor-free case then counts through its false positives instead of adding a 0-or-1 term to a
    per-case mean. The three states are sums (``dist_reduce_fx="sum"``), so a rank that saw no volume
    of this modality joins the reduction with zeros: with few validation cases and many GPUs, some ranks
    get none. A class absent from every prediction and reference gives NaN.

    Args:
        num_classes: Channels of the boolean masks given to :meth:`update`.
    """

    full_state_update = False

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        for name in ("intersection", "predicted", "reference"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, reference: Tensor) -> None:
        """Add one batch of masks (B, num_classes, X, Y, Z) (booleans or 0/1)."""
        dims = [0, *range(2, prediction.ndim)]
        prediction, reference = prediction.bool(), reference.bool()
        self.intersection += (prediction & reference).sum(dims).double()
        self.predicted += prediction.sum(dims).double()
        self.reference += reference.sum(dims).double()

    def compute(self) -> Tensor:
        return 2 * self.intersection / (self.predicted + self.reference)


def _batch_dice(logits: Tensor, label: Tensor) -> Tensor:
    """Pooled Dice of the batch per class (liver, tumor); classes absent from both sides are skipped."""
    pred = class_masks(logits.argmax(dim=1))
    ref = class_masks(label.long())
    dims = (0, 2, 3, 4)
    intersection = (pred & ref).sum(dims).float()
    total = pred.sum(dims).float() + ref.sum(dims).float()
    present = total > 0
    return (2 * intersection[present] / total[present]) if present.any() else torch.ones(1, device=logits.device)


def _cli_given_hyperparameters() -> bool:
    """True while LightningCLI instantiates the module with the config as its hyper-parameters."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # a Lightning without it: modules are then saved as weights only
        return False
    return _given_hyperparameters.get() is not None
