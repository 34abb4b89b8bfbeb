"""The segmentation network seen as a classifier, as MONAI's CAM methods need it, and map scaling.

MONAI's Grad-CAM and Grad-CAM++ explain a classifier: one scalar score per class. :class:`ClassScore`
turns the segmentation network into such a classifier: on the unimodal path (eq. 17, the absent stream
zero-filled) it returns, for every class, the mean logit over a region, by default the voxels the
network itself labels tumor. Grad-CAM of the tumor class then answers "which features make the network
call these voxels tumor".

Why the mean and not the sum: MONAI's Grad-CAM++ multiplies its weights by ``exp(score)`` (the
exponential-score derivation of Chattopadhyay et al.). A sum over thousands of voxels overflows
``exp`` in float32; the mean is a logit-sized number. (For Grad-CAM the two differ by a positive factor,
which the normalisation removes.)

Where the region is empty (no voxel predicted tumor) the whole input is used instead, and
:attr:`ClassScore.last_fallback` says so. :func:`normalise_maps` scales each map to [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aqcf.constants import TUMOR, check_stream
from aqcf.errors import AqcfError

__all__ = ["TUMOR_CLASS", "PREDICTED", "VOLUME", "SCORE_REGIONS", "normalise_maps", "ClassScore"]

TUMOR_CLASS = TUMOR
PREDICTED = "predicted"
VOLUME = "volume"
SCORE_REGIONS = (PREDICTED, VOLUME)


def normalise_maps(maps: Tensor) -> Tensor:
    """Scale each map of a batch linearly to [0, 1] (its minimum to 0, its maximum to 1).

    A constant map (e.g. all zero: no positive evidence) becomes all zero. MONAI's default
    post-processing maps the maximum to 0 instead, which would invert the heat maps.

    Args:
        maps: (B, 1, X, Y, Z) saliency after the ReLU.

    Returns:
        Tensor of the same shape with values in [0, 1].
    """
    flat = maps.detach().flatten(1)
    low = flat.min(dim=1).values
    span = flat.max(dim=1).values - low
    shape = (-1,) + (1,) * (maps.ndim - 1)
    scale = torch.where(span > 0, 1.0 / span.clamp_min(torch.finfo(span.dtype).tiny), torch.zeros_like(span))
    return ((maps.detach() - low.view(shape)) * scale.view(shape)).clamp(0.0, 1.0)


class ClassScore(nn.Module):
    """A segmentation network seen as a classifier: one score per class, as MONAI's CAM methods need.

    The network runs its unimodal path (``forward_single``, eq. 17: the absent stream zero-filled). The
    score of class ``c`` is the mean of the class-``c`` logits over a region: the voxels predicted
    ``region_class`` (``region="predicted"``), or every voxel (``region="volume"``). A sample whose
    predicted region is empty is averaged over every voxel.

    Args:
        network: a network with ``forward_single(x, modality) -> (B, C, X, Y, Z)`` logits.
        modality: ``"ct"`` or ``"mri"``.
        region: ``"predicted"`` or ``"volume"``.
        region_class: the class whose predicted voxels form the region (tumor, 2).

    Attributes:
        last_region_voxels: after a forward, the (B,) number of voxels averaged.
        last_fallback: after a forward, (B,) bool: the predicted region was empty, every voxel was used.
    """

    def __init__(
        self, network: nn.Module, modality: str, region: str = PREDICTED, region_class: int = TUMOR_CLASS
    ) -> None:
        super().__init__()
        if region not in SCORE_REGIONS:
            raise AqcfError(f"score region {region!r}: expected one of {SCORE_REGIONS}")
        self.network = network
        self.modality = check_stream(modality, network)
        self.region = region
        self.region_class = int(region_class)
        self.last_region_voxels = torch.zeros(0, dtype=torch.long)
        self.last_fallback = torch.zeros(0, dtype=torch.bool)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, 1, X, Y, Z) -> (B, C) per-class mean logits over the region."""
        logits = self.network.forward_single(x, self.modality)
        with torch.no_grad():
            if self.region == PREDICTED:
                region = logits.argmax(dim=1, keepdim=True) == self.region_class
            else:
                region = torch.ones_like(logits[:, :1], dtype=torch.bool)
            empty = ~region.flatten(1).any(dim=1)
            region[empty] = True
            weights = region.to(logits.dtype)
            count = weights.flatten(1).sum(dim=1)
        self.last_region_voxels = count.long().cpu()
        self.last_fallback = empty.cpu()
        return (logits * weights).flatten(2).sum(dim=2) / count[:, None]
