"""Training augmentation of one patch (paper §3.1.3: random flips, 90° rotations, intensity shifts).

Applied to each patch after it leaves its modality's TorchIO queue, independently per modality. The
defaults (the arguments of :func:`build_augmentation`) are those of MONAI's BTCV (Swin UNETR) training
recipe, whose transform list the paper's description matches, plus an intensity scaling; why each was
chosen: docs/data.md, *Choices where the paper is silent*. Intensity changes are in window units (the
[0, 1] scale). Rotations act in the axial plane (axes 0 and 1 after RAS/LAS reorientation) and only
when the patch is square there, so the patch keeps its shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from aqcf.constants import IMAGE, LABEL

__all__ = ["build_augmentation", "AXIAL_AXES"]

AXIAL_AXES = (0, 1)
"""Spatial axes of the axial plane once images are in RAS/LAS orientation."""


def build_augmentation(
    patch_size: Sequence[int],
    flip_prob: float = 0.1,
    rot90_prob: float = 0.1,
    intensity_shift: float = 0.1,
    intensity_scale: float = 0.1,
    intensity_prob: float = 0.5,
    seed: int | None = None,
) -> Callable[[dict], dict]:
    """Build the patch augmentation.

    Args:
        patch_size: Patch size (X, Y, Z); 90° rotations are used only when X == Y.
        flip_prob: Probability of a flip, drawn separately for each of the three axes.
        rot90_prob: Probability of rotating by 90°, 180° or 270° in the axial plane.
        intensity_shift: Largest offset added to the image (its values span [0, 1]).
        intensity_scale: Largest relative change of the image's scale (``x * (1 + f)``).
        intensity_prob: Probability of each intensity change.
        seed: Seed of the transforms' random state (``None``: from torch's generator, so
            ``seed_everything`` makes runs repeatable).

    Returns:
        A function ``{"image": (1,X,Y,Z) float, "label": (1,X,Y,Z)} -> same keys``; the label comes
        back as uint8.
    """
    from monai.transforms import (
        Compose,
        RandFlipd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )
    from monai.utils import convert_to_tensor

    keys = [IMAGE, LABEL]
    transforms = [RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    if patch_size[AXIAL_AXES[0]] == patch_size[AXIAL_AXES[1]]:
        transforms.append(RandRotate90d(keys, prob=rot90_prob, max_k=3, spatial_axes=AXIAL_AXES))
    transforms += [
        RandShiftIntensityd(IMAGE, offsets=intensity_shift, prob=intensity_prob),
        RandScaleIntensityd(IMAGE, factors=intensity_scale, prob=intensity_prob),
    ]
    compose = Compose(transforms)
    compose.set_random_state(seed=int(torch.initial_seed() % 2**32) if seed is None else seed)

    def augment(sample: dict) -> dict:
        out = compose({IMAGE: sample[IMAGE], LABEL: sample[LABEL]})
        image = convert_to_tensor(out[IMAGE], track_meta=False).float()
        label = convert_to_tensor(out[LABEL], track_meta=False)
        label = (label.round() if label.is_floating_point() else label).to(torch.uint8)
        return {**sample, IMAGE: image, LABEL: label}

    return augment
