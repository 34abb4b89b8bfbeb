"""Fold ensembles: several checkpoints segment a scan together, as ``nnUNetv2_predict`` does with its folds.

Each model runs its own sliding window over the one preprocessed volume (the checkpoints must agree on
the preprocessing, so a scan is preprocessed once); their softmax probabilities are averaged voxel by
voxel and the label is the argmax of that mean. Models that disagree on preprocessing, classes or
modalities cannot be averaged: :func:`check_agreement` names the first checkpoint and setting that
differ.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from aqcf.data.preprocess import preprocess_image
from aqcf.errors import AqcfError
from aqcf.inference.predictor import Predictor, Segmentation, segmentation_from_probabilities

__all__ = ["RUN_CHECKPOINTS", "checkpoint_paths", "check_agreement", "EnsemblePredictor"]

#: the checkpoints a run folder contributes: one per fold (``make cv`` writes ``RUN/foldK/checkpoints``)
RUN_CHECKPOINTS = "fold*/checkpoints/best.ckpt"


def checkpoint_paths(given: Sequence[str | Path]) -> list[Path]:
    """Expand ``--ckpt`` values: a file is one checkpoint, a folder gives every ``fold*/checkpoints/best.ckpt``.

    Raises:
        AqcfError: a folder without fold checkpoints, or one checkpoint given twice.
    """
    from aqcf.data.cohorts import natural_key

    paths: list[Path] = []
    for entry in given:
        path = Path(entry)
        if path.is_dir():
            found = sorted(path.glob(RUN_CHECKPOINTS), key=lambda p: natural_key(str(p.relative_to(path))))
            if not found:
                raise AqcfError(f"{path}: a folder given as --ckpt must hold {RUN_CHECKPOINTS}; none found")
            paths += found
        else:
            paths.append(path)
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise AqcfError(f"{path}: given twice as --ckpt")
        seen.add(path.resolve())
    return paths


def _description(predictor: Predictor) -> dict[str, object]:
    """What models must share to be averaged: the served modalities, the classes, each modality's preprocessing."""
    described: dict[str, object] = {
        "modalities": list(predictor.modalities),
        "classes": getattr(predictor.network, "num_classes", None),
    }
    for modality, settings in sorted(predictor.preprocessing.items()):
        for key, value in dataclasses.asdict(settings).items():
            described[f"{modality} preprocessing {key}"] = value
    return described


def check_agreement(predictors: Sequence[Predictor]) -> None:
    """Refuse models that cannot be averaged.

    Raises:
        AqcfError: one line naming the first checkpoint that differs from the first one, the setting
            and both values.
    """
    first = _description(predictors[0])
    for other in predictors[1:]:
        described = _description(other)
        for key in first.keys() | described.keys():
            if first.get(key) != described.get(key):
                raise AqcfError(
                    f"{other.source}: {key} is {described.get(key)!r} but {first.get(key)!r} in "
                    f"{predictors[0].source}; the models of an ensemble must agree on preprocessing, classes "
                    "and modalities"
                )


class EnsemblePredictor:
    """Several predictors averaged: the mean of their softmax probabilities, each on its own sliding window.

    It answers what :class:`~aqcf.inference.predictor.Predictor` answers (``check_modality``,
    ``settings``, ``segment_file``), so ``aqcf segment`` treats one model and several alike.

    Args:
        predictors: two or more predictors that agree (:func:`check_agreement`).
    """

    def __init__(self, predictors: Sequence[Predictor]) -> None:
        if not predictors:
            raise AqcfError("an ensemble needs at least one model")
        check_agreement(predictors)
        self.predictors = list(predictors)
        self.preprocessing = self.predictors[0].preprocessing
        self.modalities = self.predictors[0].modalities
        self.source = self.predictors[0].source

    def check_modality(self, modality: str) -> str:
        """``modality`` lower-cased, or :class:`AqcfError` if the models were not trained on it."""
        return self.predictors[0].check_modality(modality)

    def settings(self) -> dict:
        """JSON-able description: the ensemble rule and each model's own settings."""
        return {
            "ensemble": "mean of softmax probabilities, argmax",
            "checkpoints": [p.source for p in self.predictors],
            "models": [p.settings() for p in self.predictors],
        }

    @torch.inference_mode()
    def probabilities_on_grid(self, image: torch.Tensor, modality: str) -> torch.Tensor:
        """Mean softmax (C, X, Y, Z) of the models on one preprocessed (1, X, Y, Z) volume (float32, CPU)."""
        total = self.predictors[0].probabilities_on_grid(image, modality)
        for predictor in self.predictors[1:]:
            total += predictor.probabilities_on_grid(image, modality)
        return total / len(self.predictors)

    def segment_file(self, path: str | Path, modality: str, probabilities: bool = False) -> Segmentation:
        """Segment one scan file (NIfTI): argmax of the mean probabilities, on the scan's own grid.

        Args:
            path: the scan (HU for CT).
            modality: ``"ct"`` or ``"mri"``.
            probabilities: also return the mean probabilities on the scan's grid.
        """
        modality = self.check_modality(modality)
        start = time.perf_counter()
        image, record = preprocess_image(path, self.preprocessing[modality])
        preprocessed = time.perf_counter()
        mean = self.probabilities_on_grid(image, modality)
        return segmentation_from_probabilities(mean, record, start, preprocessed, keep=probabilities)
