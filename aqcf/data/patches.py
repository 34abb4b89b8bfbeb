"""Training patches read from the cache without loading whole volumes (the cost follows the patch).

TorchIO's ``LabelSampler`` builds a probability map over the whole label map each time a subject is
loaded, and the subject load reads the whole image: both grow with the volume (measured in
docs/data.md, *Measured patch cost*). Here, as in nnU-Net v2, preprocessing stores once per case a sample of
the voxel coordinates of each label (:func:`class_locations`, ``locations/<id>.npz`` in the cache), and
a patch is drawn in three steps:

1. a label ``k`` with the configured probability, renormalised over the labels that have a valid
   centre in this case;
2. a centre uniformly among the stored coordinates of label ``k`` whose patch fits in the volume
   (TorchIO's rule: the patch ``[c - p//2, c - p//2 + p)`` lies inside the volume), so the centre voxel
   of the patch carries label ``k``;
3. the patch is read from the uncompressed cached NIfTI files through a memory map: only the bytes of
   the patch are touched.

Volumes smaller than the patch along an axis are zero-padded symmetrically (the old
``_PadToAtLeast``), by shifting coordinates rather than building a padded copy.

The patches are drawn in the queue's subject-loading workers (:class:`DrawPatches`, the subjects
dataset's transform) and handed out by :class:`CachedPatchSampler`, so a TorchIO ``Queue`` still mixes
and serves them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torchio as tio

from aqcf.constants import IMAGE, LABEL, LABEL_VALUES
from aqcf.data.cache import memmap_volume
from aqcf.errors import AqcfError
from aqcf.io import atomic_path

__all__ = [
    "LOCATIONS_PER_CLASS",
    "LOCATIONS_MIN_FRACTION",
    "class_locations",
    "save_locations",
    "load_locations",
    "valid_centres",
    "patch_centres",
    "label_weights",
    "patch_padding",
    "read_window",
    "draw_patch",
    "DrawPatches",
    "CachedPatchSampler",
]

LOCATIONS_PER_CLASS = 10_000
"""Coordinates stored per label and case (nnU-Net v2 stores 10,000 per class too)."""
LOCATIONS_MIN_FRACTION = 0.01
"""...but never fewer than this fraction of the label's voxels, so large classes stay well covered."""
PATCHES_KEY = "patches"
LOCATIONS_KEY = "locations"


def _case_seed(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")


def class_locations(
    label: np.ndarray,
    classes: Sequence[int] = LABEL_VALUES,
    per_class: int = LOCATIONS_PER_CLASS,
    min_fraction: float = LOCATIONS_MIN_FRACTION,
    seed: int | str = 0,
) -> dict[int, np.ndarray]:
    """A uniform sample (without replacement) of the voxel coordinates of each label.

    Args:
        label: Integer label map (X, Y, Z).
        classes: Labels to sample.
        per_class: At most this many coordinates per label...
        min_fraction: ...unless this fraction of the label's voxels is more.
        seed: Seed (a case id is hashed), so a rebuilt cache stores the same coordinates.

    Returns:
        ``{k: (N_k, 3) uint16 array}``; ``N_k = 0`` for a label absent from the map.
    """
    rng = np.random.default_rng(_case_seed(seed) if isinstance(seed, str) else seed)
    flat = np.ascontiguousarray(label).reshape(-1)
    counts = np.bincount(flat, minlength=max(classes) + 1)
    out = {}
    for k in classes:
        n = int(counts[k])
        target = min(n, max(per_class, int(np.ceil(n * min_fraction))))
        if target == 0:
            indices = np.zeros(0, dtype=np.int64)
        elif n <= 4 * target or n < flat.size // 8:
            # a small class: list it (its index list is small) and choose from it
            indices = np.flatnonzero(flat == k)
            if target < n:
                indices = np.sort(rng.choice(indices, size=target, replace=False))
        else:
            # a large class (background): rejection from uniform draws, without listing every voxel
            indices = np.zeros(0, dtype=np.int64)
            while indices.size < target:
                draws = rng.integers(0, flat.size, size=int(2 * target * flat.size / n) + 16)
                indices = np.union1d(indices, draws[flat[draws] == k])
            indices = np.sort(rng.choice(indices, size=target, replace=False))
        out[int(k)] = np.stack(np.unravel_index(indices, label.shape), axis=1).astype(np.uint16)
    return out


def save_locations(path: str | Path, locations: Mapping[int, np.ndarray]) -> Path:
    """Write the coordinates of :func:`class_locations` to an ``.npz`` file, atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **{str(k): v for k, v in locations.items()})
    return Path(path)


def load_locations(path: str | Path) -> dict[int, np.ndarray]:
    """Read :func:`save_locations`' file: ``{label: (N, 3) int32}``."""
    try:
        with np.load(path) as data:
            return {int(k): data[k].astype(np.int32) for k in data.files}
    except (OSError, ValueError, KeyError) as err:
        raise AqcfError(f"{path}: unreadable label locations ({err}); delete the cache folder to rebuild") from err


def valid_centres(coords: np.ndarray, shape: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """The coordinates whose patch ``[c - p//2, c - p//2 + p)`` lies inside ``shape``."""
    half = np.asarray(patch_size) // 2
    start = coords - half
    fits = (start >= 0) & (start + np.asarray(patch_size) <= np.asarray(shape))
    return coords[fits.all(axis=1)]


def patch_centres(
    locations: Mapping[int, np.ndarray], shape: Sequence[int], patch_size: Sequence[int]
) -> dict[int, np.ndarray]:
    """Per label, the stored coordinates usable as patch centres, on the grid padded to the patch.

    Computed once per subject (not per patch): it touches every stored coordinate.
    """
    patch = np.asarray(patch_size)
    pad = patch_padding(shape, patch)
    padded = np.maximum(np.asarray(shape), patch)
    return {k: valid_centres(c.astype(np.int32) + pad.astype(np.int32), padded, patch) for k, c in locations.items()}


def label_weights(available: Mapping[int, int], probabilities: Mapping[int, float]) -> dict[int, float]:
    """The configured label probabilities renormalised over the labels with a valid centre."""
    weights = {int(k): float(p) for k, p in probabilities.items() if available.get(int(k), 0) > 0 and p > 0}
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()} if total > 0 else {}


def patch_padding(shape: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """Zeros added before the volume along each axis so that it is at least the patch size."""
    missing = np.maximum(np.asarray(patch_size) - np.asarray(shape), 0)
    return missing // 2


def read_window(array: np.ndarray, start: np.ndarray, patch_size: Sequence[int], pad: np.ndarray) -> np.ndarray:
    """``array`` zero-padded by ``pad`` before each axis, cropped to ``[start, start + patch)``."""
    out = np.zeros(tuple(patch_size), dtype=array.dtype)
    src_lo = np.maximum(start - pad, 0)
    src_hi = np.minimum(start - pad + np.asarray(patch_size), array.shape)
    dst_lo = src_lo - (start - pad)
    dst_hi = dst_lo + (src_hi - src_lo)
    src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))
    dst = tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi, strict=True))
    out[dst] = array[src]
    return out


def draw_patch(
    image: np.ndarray,
    label: np.ndarray,
    centres: Mapping[int, np.ndarray],
    patch_size: Sequence[int],
    probabilities: Mapping[int, float],
    generator: torch.Generator | None = None,
) -> dict:
    """Draw one training patch (see the module docstring).

    Args:
        image: (X, Y, Z) array (a memory map reads only the patch).
        label: (X, Y, Z) integer array on the same grid.
        centres: Usable centres per label (:func:`patch_centres` of the stored locations).
        patch_size: (PX, PY, PZ).
        probabilities: Probability of centring on each label.
        generator: torch random generator (``None``: torch's global one, seeded by ``seed_everything``
            and, in a loader worker, per worker).

    Returns:
        ``{"image": (1, PX, PY, PZ) float32 tensor, "label": (1, PX, PY, PZ) uint8 tensor, "start":
        the patch's first voxel on the volume's grid (negative inside the zero padding), "centre_label"
        the label drawn (``None`` when no label had a valid centre and the patch was placed uniformly)}``.
    """
    patch = np.asarray(patch_size, dtype=np.int64)
    pad = patch_padding(image.shape, patch)
    shape = np.maximum(np.asarray(image.shape), patch)
    weights = label_weights({k: len(c) for k, c in centres.items()}, probabilities)
    chosen = None
    if weights:
        keys = list(weights)
        index = torch.multinomial(torch.tensor([weights[k] for k in keys]), 1, generator=generator).item()
        chosen = keys[index]
        pool = centres[chosen]
        centre = pool[torch.randint(len(pool), (1,), generator=generator).item()]
        start = centre - patch // 2
    else:
        high = shape - patch + 1
        start = np.array([torch.randint(int(h), (1,), generator=generator).item() for h in high])
    image_patch = read_window(image, start, patch, pad).astype(np.float32, copy=False)
    label_patch = read_window(label, start, patch, pad).astype(np.uint8, copy=False)
    return {
        IMAGE: torch.from_numpy(image_patch)[None],
        LABEL: torch.from_numpy(label_patch)[None],
        "start": (start - pad).tolist(),
        "centre_label": chosen,
    }


class DrawPatches:
    """Subjects-dataset transform: read a subject's training patches from the cache.

    The subject holds lazy (never loaded) TorchIO images of the cached files and the path of its label
    locations; the transform adds ``subject["patches"]``, a list of ``samples`` patch dicts
    (:func:`draw_patch`). Run in the queue's workers, so the reading is parallel.
    """

    def __init__(self, patch_size: Sequence[int], probabilities: Mapping[int, float], samples: int):
        self.patch_size = tuple(int(n) for n in patch_size)
        self.probabilities = {int(k): float(p) for k, p in probabilities.items()}  # JSON/YAML keys may be text
        self.samples = int(samples)

    def __call__(self, subject):
        image = memmap_volume(subject[IMAGE].path)
        label = memmap_volume(subject[LABEL].path)
        if image.shape != label.shape:
            raise AqcfError(f"{subject[IMAGE].path}: cached image and label grids differ; delete the cache to rebuild")
        centres = patch_centres(load_locations(subject[LOCATIONS_KEY]), image.shape, self.patch_size)
        subject[PATCHES_KEY] = [
            draw_patch(image, label, centres, self.patch_size, self.probabilities) for _ in range(self.samples)
        ]
        return subject


class CachedPatchSampler(tio.data.PatchSampler):
    """TorchIO patch sampler handing out the patches :class:`DrawPatches` read for a subject.

    Each patch leaves the subject as it is handed out, so the queue's partial refill of a subject (when
    the queue is full midway) continues with the patches not yet served.
    """

    def __call__(self, subject, num_patches: int | None = None) -> Generator:
        # No check of the subject's space: its images are never loaded, the patches are read already.

        patches = subject[PATCHES_KEY]
        served = 0
        while patches and (num_patches is None or served < num_patches):
            patch = patches.pop(0)
            served += 1
            yield tio.Subject(
                image=tio.ScalarImage(tensor=patch[IMAGE]),
                label=tio.LabelMap(tensor=patch[LABEL]),
                id=subject["id"],
                modality=subject["modality"],
                start=patch["start"],
                centre_label=patch["centre_label"],
            )
