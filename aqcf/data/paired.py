"""Paired CT/MRI patients for fine-tuning (the paper's future work 2): preprocessing, patches, mixing.

A paired patient (``aqcf synth --paired``, :func:`aqcf.data.phantoms.read_paired`) has a CT and an MRI
scan that are aligned in world coordinates but lie on different voxel grids. For training both are put
on one grid, the patient's preprocessed CT grid:

1. the CT (and its label) goes through the CT cohort's preprocessing and cache
   (:func:`~aqcf.data.cache.preprocess_cohort`, cache folder ``paired-ct-<key>``, with its input
   gate and checks);
2. the MRI is checked by the same gate, resampled onto that grid in world coordinates (linear for the
   image, nearest neighbour for its label; outside the MRI's field of view the image is the window
   floor, 0, and the label background) and windowed as the MRI cohort is (``mri_window`` to [0, 1]).
   These files go to ``paired-mri-<key>/`` beside the CT cache (what ``key`` covers, options and
   mixing: docs/data.md, *Paired fine-tuning batches*).

A paired patch is read at one location of that grid from all four arrays (centred by the CT label with
the configured label probabilities, :func:`aqcf.data.patches.draw_patch`), and one spatial augmentation
(flips, 90° rotations) is applied to the CT and MRI patches stacked as channels; the intensity
augmentation is then drawn per modality. :class:`MixedBatches` interleaves paired and unpaired batches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from aqcf.constants import CT, IMAGE, LABEL, MRI
from aqcf.data.cache import (
    Manifest,
    check_cached_files,
    file_digest,
    file_fingerprint,
    memmap_volume,
    preprocess_cohort,
)
from aqcf.data.cohorts import Case, validate_case
from aqcf.data.patches import draw_patch, load_locations, patch_centres, patch_padding, read_window
from aqcf.data.preprocess import PreprocessSettings, load_scan
from aqcf.errors import AqcfError
from aqcf.io import nifti_image, save_nifti_atomic, write_json_atomic

__all__ = ["scan_on_grid", "mri_on_ct_grid", "preprocess_paired", "PairedPatches", "augment_pair", "MixedBatches"]


def scan_on_grid(
    image_path: str | Path, label_path: str | Path | None, reference, settings: PreprocessSettings
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A scan (and label) of any modality resampled onto another scan's preprocessed grid, windowed to [0, 1].

    The scan is world-aligned with the one that made the grid (co-registered) but may lie on any voxel
    grid: it is resampled in world coordinates through both affines (linear for the image, nearest
    neighbour for the label; outside its field of view the image is the window floor, 0, and the label
    background), then windowed as its own modality is.

    Args:
        image_path: The scan (any grid, world-aligned with the reference).
        label_path: Its label map on its own grid, or ``None``.
        reference: A NIfTI file on the target grid (e.g. a cached, preprocessed CT image), or its
            ``(shape, affine)``.
        settings: The scan's own modality's preprocessing (only ``window`` is used: the grid is the
            reference's).

    Returns:
        ``(image float32 (X, Y, Z) in [0, 1], label uint8 (X, Y, Z) or None, affine 4x4)`` on the target grid.
    """
    import torchio as tio

    case = Case(f"paired-{settings.modality}", settings.modality, Path(image_path),
                None if label_path is None else Path(label_path))
    validate_case(case)
    image = load_scan(Path(image_path), "image")
    image.set_data(image.data.to(torch.float32))
    subject = tio.Subject(image=image)
    if label_path is not None:
        subject.add_image(load_scan(Path(label_path), "label"), "label")
        subject = tio.CopyAffine("image")(subject)  # within the gate's tolerance the grids are equal
    low, high = settings.window
    target = str(reference) if isinstance(reference, str | Path) else reference
    transform = tio.Compose(
        [
            tio.Resample(target, image_interpolation="linear", label_interpolation="nearest"),
            tio.Clamp(out_min=low, out_max=high),
            tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=(low, high)),
        ]
    )
    subject = transform(subject)
    label = subject["label"].data[0].numpy().astype(np.uint8) if label_path is not None else None
    return subject["image"].data[0].numpy().astype(np.float32), label, np.asarray(subject["image"].affine)


def mri_on_ct_grid(
    mri_image: str | Path, mri_label: str | Path | None, ct_reference, settings: PreprocessSettings
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """An MRI scan (and label) resampled onto a preprocessed CT grid and windowed to [0, 1].

    :func:`scan_on_grid` for the paired patients.

    Args:
        mri_image: The MRI scan (any grid, world-aligned with the CT).
        mri_label: Its label map on its own grid, or ``None``.
        ct_reference: A NIfTI file on the target grid (the cached, preprocessed CT image), or its
            ``(shape, affine)``.
        settings: The MRI preprocessing (only ``window`` is used: the grid is the CT's).

    Returns:
        ``(image float32 (X, Y, Z) in [0, 1], label uint8 (X, Y, Z) or None, affine 4x4)`` on the CT grid.
    """
    return scan_on_grid(mri_image, mri_label, ct_reference, settings)


def preprocess_paired(
    cases: Sequence[dict],
    ct_settings: PreprocessSettings,
    mri_settings: PreprocessSettings,
    cache_dir: str | Path,
    progress: bool = False,
    verify: str = "size",
) -> list[dict]:
    """Preprocess paired patients into the cache (see the module docstring); reuses intact cached files.

    Args:
        cases: :func:`~aqcf.data.phantoms.read_paired` entries (``id``, ``ct_image``, ``mri_image``,
            ``ct_label``, ``mri_label``).
        ct_settings, mri_settings: The two cohorts' preprocessing.
        cache_dir: Parent folder of the caches.
        progress: Progress bar for the CT part.
        verify: How reused cached files are checked (``"size"`` or ``"checksum"``).

    Returns:
        Per case ``{"id", "ct_image", "ct_label", "mri_image", "mri_label", "locations"}``: cached file
        paths on the patient's preprocessed CT grid (``locations`` those of the CT label).
    """
    ct_cases = [Case(c["id"], CT, Path(c["ct_image"]), Path(c["ct_label"])) for c in cases]
    manifest: Manifest = preprocess_cohort(
        ct_cases, ct_settings, cache_dir, name="paired-ct", progress=progress, verify=verify
    )
    files = [[c["id"], file_fingerprint(Path(c["mri_image"])), file_fingerprint(Path(c["mri_label"]))] for c in cases]
    text = json.dumps({"ct": manifest.key, "window": list(mri_settings.window), "cases": files}, sort_keys=True)
    folder = Path(cache_dir) / f"paired-mri-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    out = []
    for case, ct in zip(cases, manifest.entries, strict=True):
        record_path = folder / "records" / f"{case['id']}.json"
        entry = json.loads(record_path.read_text()) if record_path.is_file() else None
        if entry is None or check_cached_files(entry, folder, verify):
            image, label, affine = mri_on_ct_grid(case["mri_image"], case["mri_label"], ct[IMAGE], mri_settings)
            entry = {"id": case["id"], "image": f"images/{case['id']}.nii", "label": f"labels/{case['id']}.nii"}
            save_nifti_atomic(nifti_image(image, affine), folder / entry[IMAGE])
            save_nifti_atomic(nifti_image(label, affine), folder / entry[LABEL])
            entry["files"] = {key: file_digest(folder / entry[key]) for key in (IMAGE, LABEL)}
            write_json_atomic(record_path, entry, indent=1)  # last: a record exists only for a complete case
        out.append({
            "id": case["id"],
            "ct_image": ct[IMAGE],
            "ct_label": ct[LABEL],
            "locations": ct["locations"],
            "mri_image": str(folder / entry[IMAGE]),
            "mri_label": str(folder / entry[LABEL]),
        })
    return out


def augment_pair(spatial, intensity: dict, ct: dict, mri: dict) -> tuple[dict, dict]:
    """One spatial augmentation for both modalities, then each modality's own intensity augmentation.

    Args:
        spatial: :func:`~aqcf.data.augment.build_augmentation` with the flips and rotations (no
            intensity change), applied once to the two patches stacked as channels.
        intensity: ``{"ct": f, "mri": f}``, intensity-only augmentations.
        ct, mri: ``{"image": (1, X, Y, Z), "label": (1, X, Y, Z), ...}`` on one grid.
    """
    stacked = spatial({IMAGE: torch.cat([ct[IMAGE], mri[IMAGE]]), LABEL: torch.cat([ct[LABEL], mri[LABEL]])})
    out = []
    for channel, (modality, sample) in enumerate(((CT, ct), (MRI, mri))):
        moved = {**sample, IMAGE: stacked[IMAGE][channel : channel + 1], LABEL: stacked[LABEL][channel : channel + 1]}
        out.append(intensity[modality](moved))
    return out[0], out[1]


class PairedPatches(Dataset):
    """Paired training patches: ``{"ct": {"image", "label", "id"}, "mri": {...}}`` of one patient.

    Each item picks a patient and a location with its own generator (seeded, so runs repeat), reads the
    four arrays there and augments them (:func:`augment_pair`). ``len`` is patients × ``samples``.

    Args:
        entries: :func:`preprocess_paired` entries.
        patch_size: (X, Y, Z) voxels.
        probabilities: Probability of centring on each label (of the CT label).
        samples: Patches per patient and epoch.
        seed: Seed of the patient, location and augmentation draws.
        augment: ``(spatial, {"ct": f, "mri": f})`` for :func:`augment_pair`, or ``None``.
    """

    def __init__(self, entries: Sequence[dict], patch_size, probabilities, samples: int, seed: int, augment=None):
        if not entries:
            raise AqcfError("data.paired_root: no paired patient left for training")
        self.entries = list(entries)
        self.patch_size = tuple(int(n) for n in patch_size)
        self.probabilities = {int(k): float(p) for k, p in probabilities.items()}
        self.samples = int(samples)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.augment = augment
        self._centres: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.entries) * self.samples

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[torch.randint(len(self.entries), (1,), generator=self.generator).item()]
        ct_image, ct_label = memmap_volume(entry["ct_image"]), memmap_volume(entry["ct_label"])
        mri_image, mri_label = memmap_volume(entry["mri_image"]), memmap_volume(entry["mri_label"])
        if not ct_image.shape == ct_label.shape == mri_image.shape == mri_label.shape:
            raise AqcfError(f"{entry['mri_image']}: paired cache grids differ; delete the cache to rebuild")
        if entry["id"] not in self._centres:
            locations = load_locations(entry["locations"])
            self._centres[entry["id"]] = patch_centres(locations, ct_image.shape, self.patch_size)
        ct = draw_patch(ct_image, ct_label, self._centres[entry["id"]], self.patch_size, self.probabilities,
                        self.generator)
        # the same window of the MRI arrays (``start`` is on the unpadded grid)
        pad = patch_padding(ct_image.shape, self.patch_size)
        start = np.asarray(ct["start"]) + pad
        mri = {
            IMAGE: torch.from_numpy(read_window(mri_image, start, self.patch_size, pad).astype(np.float32))[None],
            LABEL: torch.from_numpy(read_window(mri_label, start, self.patch_size, pad).astype(np.uint8))[None],
        }
        ct = {IMAGE: ct[IMAGE], LABEL: ct[LABEL], "id": entry["id"]}
        mri["id"] = entry["id"]
        if self.augment is not None:
            ct, mri = augment_pair(*self.augment, ct, mri)
        return {CT: ct, MRI: mri}


class _EpochForward:
    """``set_epoch`` for Lightning (it looks for ``loader.sampler.set_epoch``), forwarded to the parts."""

    def __init__(self, mixed: MixedBatches):
        self.mixed = mixed

    def set_epoch(self, epoch: int) -> None:
        self.mixed.epoch = int(epoch)
        for loader in self.mixed.unpaired.values():
            if callable(getattr(loader.sampler, "set_epoch", None)):
                loader.sampler.set_epoch(epoch)


class MixedBatches:
    """Training batches mixing unpaired and paired ones: step ``i`` is paired with probability ``ratio``.

    The draw is a Bernoulli per step from a generator seeded with ``(seed, epoch)``, so a run repeats.
    The unpaired batches are those of the per-modality loaders, each restarted when exhausted (the
    ``max_size_cycle`` rule of ``CombinedLoader``); the paired loader restarts likewise. An epoch has
    ``length`` steps.

    Args:
        unpaired: ``{"ct": DataLoader, "mri": DataLoader}`` of unpaired patches.
        paired: DataLoader of :class:`PairedPatches`.
        ratio: Share of paired batches, in [0, 1] (1: only paired).
        seed: Seed of the per-step draw.
        length: Steps per epoch.
    """

    def __init__(self, unpaired: dict, paired, ratio: float, seed: int, length: int):
        self.unpaired = unpaired
        self.paired = paired
        self.ratio = float(ratio)
        self.seed = int(seed)
        self.length = int(length)
        self.epoch = 0
        self.sampler = _EpochForward(self)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        iterators: dict = {}

        def draw(name: str, loader):
            if name not in iterators:
                iterators[name] = iter(loader)
            try:
                return next(iterators[name])
            except StopIteration:
                iterators[name] = iter(loader)
                return next(iterators[name])

        for _ in range(self.length):
            if torch.rand(1, generator=generator).item() < self.ratio:
                yield draw("paired", self.paired)
            else:
                yield {m: draw(m, loader) for m, loader in self.unpaired.items()}
