"""Several co-registered scans of one patient through one sliding window (``aqcf segment`` with several
``--modality``).

The scans are world-aligned (co-registered) but may lie on different voxel grids. The FIRST modality's
scan goes through its own preprocessing (:func:`aqcf.data.preprocess.preprocess_image`: reorient, crop to
the body, resample, window, pad), which fixes the common grid; every other scan is resampled onto that
grid in world coordinates, linearly, and windowed with its own modality's window
(:func:`aqcf.data.paired.scan_on_grid`, what the paired fine-tuning does with the MRI). One sliding window
over the stacked images runs ``forward_present`` (the streams not given are zero-filled, eq. 17), and each
requested stream's labels go back to its own scan's voxel grid by nearest neighbour in world coordinates
(:func:`aqcf.data.preprocess.restore_to_original`; for the first scan that is the single-modality path's
restoration exactly).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from aqcf.data.preprocess import restore_to_original
from aqcf.errors import AqcfError
from aqcf.inference.predictor import Predictor, Segmentation, segmentation_from_probabilities
from aqcf.networks.sliding_window import argmax_labels

__all__ = ["preprocess_present", "segment_present"]


def preprocess_present(scans: Mapping[str, str | Path], predictor: Predictor) -> tuple[dict[str, Tensor], dict]:
    """Co-registered scans of one patient on the first scan's preprocessed grid.

    Args:
        scans: ``{modality: NIfTI path}``; the first entry's preprocessing makes the grid.
        predictor: gives each modality's :class:`~aqcf.data.preprocess.PreprocessSettings`.

    Returns:
        ``({modality: float32 (1, X, Y, Z) in [0, 1]}, {modality: record})`` on one grid; each record has
        the common grid (``preprocessed_shape``, ``preprocessed_affine``) and that scan's own
        (``original_shape``, ``original_affine``), what :func:`~aqcf.data.preprocess.restore_to_original`
        needs. The first modality's record is :func:`~aqcf.data.preprocess.preprocess_image`'s.
    """
    from aqcf.data.paired import scan_on_grid
    from aqcf.data.preprocess import preprocess_image

    if not scans:
        raise AqcfError("give at least one scan")
    names = [predictor.check_modality(m) for m in scans]
    if len(set(names)) != len(names):
        raise AqcfError(f"modalities {names}: each may be given once")
    paths = dict(zip(names, (Path(p) for p in scans.values()), strict=True))
    first, *others = names
    image, record = preprocess_image(paths[first], predictor.preprocessing[first])
    grid = (tuple(int(n) for n in record["preprocessed_shape"]), np.asarray(record["preprocessed_affine"], dtype=float))
    images, records = {first: image}, {first: record}
    for modality in others:
        array, _, _ = scan_on_grid(paths[modality], None, grid, predictor.preprocessing[modality])
        images[modality] = torch.from_numpy(array)[None]
        header = nib.load(paths[modality])  # the voxels were read (and checked) above
        records[modality] = {
            "preprocessed_shape": list(grid[0]),
            "preprocessed_affine": grid[1].tolist(),
            "original_shape": [int(n) for n in header.shape[:3]],
            "original_affine": np.asarray(header.affine, dtype=float).tolist(),
            "resampled_onto": first,
        }
    return images, records


def segment_present(
    scans: Mapping[str, str | Path], predictor: Predictor, probabilities: bool = False
) -> dict[str, Segmentation]:
    """Segment co-registered scans of one patient together: every given stream's labels on its own scan's grid.

    Args:
        scans: ``{modality: NIfTI path}`` (see :func:`preprocess_present`; the first makes the grid).
        predictor: a single :class:`~aqcf.inference.predictor.Predictor` (no test-time augmentation).
        probabilities: also return each stream's softmax on its scan's grid.

    Returns:
        ``{modality: Segmentation}`` in the order given; the timings are the patient's, shared.
    """
    start = time.perf_counter()
    images, records = preprocess_present(scans, predictor)
    preprocessed = time.perf_counter()
    logits = predictor.logits_present(images, outputs=list(images))
    if probabilities:
        return {
            modality: segmentation_from_probabilities(
                torch.softmax(logits[modality][0], dim=0).cpu(), records[modality], start, preprocessed
            )
            for modality in images
        }
    inferred = time.perf_counter()
    # the argmax of the logits, as the single-modality path takes it
    labels = {m: restore_to_original(argmax_labels(logits[m]).numpy(), records[m]) for m in images}
    seconds = {"preprocess": preprocessed - start, "inference": inferred - preprocessed,
               "restore": time.perf_counter() - inferred}
    return {m: Segmentation(labels=labels[m], record=records[m], seconds=dict(seconds)) for m in images}
