"""``aqcf predict``: a Lightning callback writing each predicted volume as a mask in its scan's geometry.

``SegmentationModule.predict_step`` returns, per volume of the data module's predict loader (the test
cases: an external cohort where configured, else the fold's validation cases), the label map on the
preprocessed grid with the case's manifest ``record``. :class:`PredictionMaskWriter` maps it back onto the
source scan's voxel grid (:func:`aqcf.data.preprocess.restore_to_original`) and writes, atomically,

* ``<output_dir>/<case id>.nii.gz``: uint8 labels 0/1/2 with the source scan's shape, affine and header
  geometry (case ids are the cohort's, e.g. ``lits-3``, so ``aqcf evaluate`` matches them);
* ``<output_dir>/<case id>.json``: the clinical measures of :mod:`aqcf.inference.measures`.

``output_dir`` defaults to ``<trainer.default_root_dir>/predictions``. ``aqcf`` attaches the callback to
every LightningCLI run (settings ``--prediction_writer.*``); it acts only in ``predict``::

    aqcf predict --config configs/lits_atlas.yaml --ckpt_path runs/lits_atlas/fold0/checkpoints/best.ckpt

After writing, the label tensor is dropped from the returned prediction (replaced by the mask's path and
the measures), so ``Trainer.predict`` does not keep every volume in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
from lightning.pytorch.callbacks import BasePredictionWriter

from aqcf.data.preprocess import restore_to_original
from aqcf.errors import AqcfError

__all__ = ["PREDICTIONS_DIR", "PredictionMaskWriter"]

PREDICTIONS_DIR = "predictions"


class PredictionMaskWriter(BasePredictionWriter):
    """Write ``aqcf predict`` outputs as masks in original geometry, with measures.

    Args:
        output_dir: folder of the masks; default ``<trainer.default_root_dir>/predictions``.
        suffix: appended to each case id in the file names (default none).
        overwrite: replace masks already there (default True: the folder belongs to the run).
        measures: also write the measures JSON beside each mask.
    """

    def __init__(
        self, output_dir: str | None = None, suffix: str = "", overwrite: bool = True, measures: bool = True
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.suffix = suffix
        self.overwrite = overwrite
        self.measures = measures

    def folder(self, trainer) -> Path:
        """Where the masks go."""
        return Path(self.output_dir or os.path.join(trainer.default_root_dir, PREDICTIONS_DIR))

    def write_on_batch_end(
        self,
        trainer,
        pl_module,
        prediction: dict[str, Any] | None,
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if prediction is None:  # a modality the model does not serve
            return
        from aqcf.inference.measures import scan_measures
        from aqcf.inference.segment import write_mask
        from aqcf.io import write_text_atomic

        record = prediction.get("record")
        if not record or "source_image" not in record:
            raise AqcfError(
                f"case {prediction.get('id')}: the predict loader gave no record of the source scan; use "
                "UnpairedDataModule's predict_dataloader"
            )
        labels = restore_to_original(prediction.pop("labels").numpy(), record)
        source = nib.load(record["source_image"])
        base = self.folder(trainer) / f"{prediction['id']}{self.suffix}"
        mask_path = base.with_name(base.name + ".nii.gz")
        if mask_path.exists() and not self.overwrite:
            raise AqcfError(f"{mask_path}: already exists (set overwrite: true on the writer to replace it)")
        write_mask(mask_path, labels, source)
        prediction["mask"] = str(mask_path)
        if self.measures:
            measures = scan_measures(labels, source.affine)
            info = {"id": prediction["id"], "modality": prediction["modality"], "input": record["source_image"]}
            text = json.dumps({**info, "mask": str(mask_path), **measures}, indent=1, allow_nan=False) + "\n"
            write_text_atomic(base.with_name(base.name + ".json"), text)
            prediction["measures"] = {k: v for k, v in measures.items() if k != "tumors"}
        # the stored prediction no longer needs the record (a dict per case, kept by Trainer.predict)
        prediction.pop("record", None)
