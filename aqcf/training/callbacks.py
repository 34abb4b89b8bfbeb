"""Callbacks: validation overlay pictures (W&B and PNG files)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

__all__ = ["ValidationOverlays"]


class ValidationOverlays(L.Callback):
    """After each validation, draws a few axial slices of the first case of each modality.

    Liver red, tumor blue; columns ground truth and prediction. Logged as images to W&B when a
    ``WandbLogger`` is attached, and written as ``<default_root_dir>/overlays/epoch{E:03d}_{modality}.png``.

    Args:
        n_slices: axial slices per picture (those with most foreground).
        every_n_epochs: draw every n-th validation.
        save_png: also write the PNG files.
    """

    def __init__(self, n_slices: int = 3, every_n_epochs: int = 1, save_png: bool = True) -> None:
        self.n_slices = n_slices
        self.every_n_epochs = max(1, every_n_epochs)
        self.save_png = save_png

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cases = getattr(pl_module, "overlay_cases", {})
        if trainer.sanity_checking or not trainer.is_global_zero or not cases:
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        from aqcf.visualize.overlays import save_overlay_png

        out = Path(trainer.default_root_dir) / "overlays"
        out.mkdir(parents=True, exist_ok=True)
        paths, captions = [], []
        for modality, (image, label, prediction) in sorted(cases.items()):
            path = out / f"epoch{trainer.current_epoch:03d}_{modality}.png"
            save_overlay_png(
                path,
                image,
                {"ground truth": label, "prediction": prediction},
                n_slices=self.n_slices,
                title=f"{modality.upper()} validation, epoch {trainer.current_epoch}",
            )
            paths.append(str(path))
            captions.append(modality)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/overlays", images=paths, caption=captions, step=trainer.global_step)
        if not self.save_png:
            for path in paths:
                os.remove(path)
