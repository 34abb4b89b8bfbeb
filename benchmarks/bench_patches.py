"""Training-patch benchmark: CPU seconds per patch of the data module, the cache's patch reads against
the whole-volume TorchIO path they replace, on LiTS-sized phantoms and on volumes twice as large.

Cohorts (``aqcf synth`` sizes of issue 12): 4 CT of 256×256×120 voxels at 1.4×1.4×3.0 mm and 4 MRI of
224×224×80 at 1.6×1.6×3.6 mm, about 320×256×368 voxels once cropped and resampled to 1 mm; the
"twice as large" cohort has twice the slices at the same spacing (2 CT + 2 MRI). Paper settings:
patch 256×256×16, ``samples_per_volume`` 4, label probabilities 0.2/0.4/0.4, augmentation on, 0
queue workers (everything in this process, so ``time.process_time`` is the data path's CPU time).

* ``new``: :class:`~aqcf.data.datamodule.UnpairedDataModule` as shipped (lazy subjects, patches read
  through memory maps at stored label locations).
* ``old``: the previous path, rebuilt here from TorchIO alone: whole-volume subjects loaded by the
  queue, zero-padded to the patch, ``tio.LabelSampler`` over the whole label map.

Both feed the same :class:`~aqcf.data.datamodule._PatchStream` (augmentation), both are timed in one
run, interleaved, after each queue's first fill.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

PATCH = (256, 256, 16)
SAMPLES = 4
CT = dict(shape=(256, 256, 120), spacing=(1.4, 1.4, 3.0))
MRI = dict(shape=(224, 224, 80), spacing=(1.6, 1.6, 3.6))
QUICK_CT = dict(shape=(128, 128, 60), spacing=(2.8, 2.8, 6.0))
QUICK_MRI = dict(shape=(112, 112, 40), spacing=(3.2, 3.2, 7.2))


def _double(size: dict) -> dict:
    x, y, z = size["shape"]
    return {**size, "shape": (x, y, 2 * z)}


def _old_loader(dm, modality: str):
    """The whole-volume TorchIO path of earlier releases, over the same cached NIfTI files."""
    import numpy as np
    import torchio as tio
    from torch.utils.data import DataLoader

    from aqcf.data.augment import build_augmentation
    from aqcf.data.datamodule import _PatchStream

    def pad_to_patch(subject):
        missing = np.maximum(np.asarray(PATCH) - np.asarray(subject.spatial_shape), 0)
        if not missing.any():
            return subject
        return tio.Pad([int(n) for m in missing for n in (m // 2, m - m // 2)])(subject)

    subjects = [
        tio.Subject(image=tio.ScalarImage(e["image"]), label=tio.LabelMap(e["label"]), id=e["id"])
        for e in dm.train_entries[modality]
    ]
    queue = tio.Queue(
        tio.SubjectsDataset(subjects, transform=pad_to_patch),
        max_length=dm.hparams.queue_length,
        samples_per_volume=SAMPLES,
        sampler=tio.LabelSampler(PATCH, label_name="label", label_probabilities=dm.label_probabilities),
        num_workers=0,
        shuffle_subjects=True,
        shuffle_patches=True,
        start_background=False,
    )
    return DataLoader(_PatchStream(queue, build_augmentation(PATCH, seed=0)), batch_size=1, num_workers=0)


def _cpu_per_patch(loader, patches: int) -> tuple[float, float]:
    """CPU and wall seconds per patch over ``patches`` patches, after the queue's first fill."""
    iterator = iter(loader)
    next(iterator)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(patches):
        try:
            next(iterator)
        except StopIteration:
            iterator = iter(loader)
            next(iterator)
    return (time.process_time() - cpu) / patches, (time.perf_counter() - wall) / patches


def _cohort_rows(root: Path, label: str, n: int, ct: dict, mri: dict, patches: int) -> list[dict]:
    from aqcf.data.datamodule import UnpairedDataModule
    from aqcf.data.phantoms import ct_config, mri_config, synthesize

    synthesize(root / "phantoms", n_ct=n, n_mri=n, ct=ct_config(**ct), mri=mri_config(**mri), progress=False)
    dm = UnpairedDataModule(
        str(root / "phantoms" / "LiTS"),
        str(root / "phantoms" / "ATLAS"),
        cache_dir=str(root / "cache"),
        patch_size=PATCH,
        samples_per_volume=SAMPLES,
        queue_length=2 * SAMPLES,
        num_workers=0,
        progress=False,
        n_folds=n,
        protocol="heldout",  # every non-test case trains: the patch cost is what is measured
    )
    dm.prepare_data()
    dm.setup("fit")
    voxels = max(e["preprocessed_shape"][0] * e["preprocessed_shape"][1] * e["preprocessed_shape"][2]
                 for m in dm.modalities for e in dm.train_entries[m])
    new = dm.train_dataloader()
    timings: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    for modality in dm.modalities:
        # interleaved: the new path, then the old one, per modality
        timings["new"].append(_cpu_per_patch(new.iterables[modality], patches))
        timings["old"].append(_cpu_per_patch(_old_loader(dm, modality), patches))
    rows = []
    per = {k: (sum(c for c, _ in v) / len(v), sum(w for _, w in v) / len(v)) for k, v in timings.items()}
    for name in ("old", "new"):
        rows.append(
            {
                "benchmark": "patches",
                "case": f"{label}, {name} data path",
                "metric": "CPU per patch",
                "value": per[name][0],
                "unit": "s",
                "note": f"wall {per[name][1]:.3f} s; largest volume {voxels / 1e6:.1f} M voxels at 1 mm; "
                f"{patches} patches per modality, 0 workers",
            }
        )
    rows.append(
        {
            "benchmark": "patches",
            "case": f"{label}, new / old",
            "metric": "CPU ratio",
            "value": per["new"][0] / per["old"][0],
            "unit": "x",
            "note": "",
        }
    )
    return rows


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows (see :mod:`benchmarks.run`)."""
    ct, mri = (QUICK_CT, QUICK_MRI) if quick else (CT, MRI)
    patches = 8 if quick else 24
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += _cohort_rows(Path(tmp) / "lits", "LiTS-sized (4 CT + 4 MRI)", 4, ct, mri, patches)
    with tempfile.TemporaryDirectory() as tmp:
        rows += _cohort_rows(Path(tmp) / "double", "twice the slices (2 CT + 2 MRI)", 2, _double(ct), _double(mri),
                             patches)
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2))
