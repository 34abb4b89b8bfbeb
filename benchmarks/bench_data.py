"""Data benchmark: drawing a phantom, preprocessing one realistic CT volume, training batches per second.

* Phantom: one CT phantom at :func:`aqcf.data.phantoms.ct_config`'s default size drawn by
  :func:`~aqcf.data.phantoms.make_case` (after one warm-up draw); it should take under 5 s
  (:data:`PHANTOM_BUDGET_S`), so ``aqcf synth`` of a demo cohort stays interactive.
* Preprocessing: a LiTS-sized CT phantom (512×512×200 voxels at 0.8×0.8×2.5 mm, int16 HU, stored
  uncompressed like LiTS) through :func:`aqcf.data.cache.preprocess_case` (validation, RAS,
  foreground crop, 1 mm resampling, window, padding, writing the cache files). It runs in a fresh
  Python process (this file with ``--case``) so that the peak resident set size (``VmHWM`` of
  ``/proc/self/status``, imports included) belongs to it alone; the RSS after imports is reported
  beside it. ``ru_maxrss`` is not used: Linux carries it over from the parent across ``exec``.
  The volume is a 128×128×50 phantom upsampled (linear, labels nearest) with fresh noise, which is
  faster to draw than a native 512×512×200 phantom and costs the pipeline the same.
* Loading: :class:`~aqcf.data.datamodule.UnpairedDataModule` over a phantom cohort preprocessed at the
  paper's settings, paper patch 256×256×16, augmentation on, one CT-MRI pair per batch; batches per
  second after the queues' first fill, with 0 and 2 queue workers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REALISTIC_SHAPE = (512, 512, 200)
REALISTIC_SPACING = (0.8, 0.8, 2.5)
QUICK_SHAPE = (256, 256, 100)
QUICK_SPACING = (1.6, 1.6, 5.0)
DRAW_SHAPE = (128, 128, 50)
NOISE_HU = 12.0
PATCH = (256, 256, 16)
KIB_PER_MIB = 1024
PHANTOM_BUDGET_S = 5.0
"""The time one default-size CT phantom should take to draw (once a test's bound)."""


def _write_ct_volume(folder: Path, shape, spacing) -> None:
    """A LiTS-style pair ``volume-0.nii`` / ``segmentation-0.nii`` of the given size."""
    import nibabel as nib
    from scipy import ndimage

    from aqcf.data.phantoms import ct_config, make_case

    # scipy's zoom maps the first and last voxel centres onto each other: scale the grid accordingly
    scale = (np.asarray(DRAW_SHAPE) - 1) / (np.asarray(shape) - 1)
    draw_spacing = tuple(np.asarray(spacing) / scale)
    rng = np.random.default_rng(0)
    image, label, affine = make_case(ct_config(shape=DRAW_SHAPE, spacing=draw_spacing), rng)
    factors = np.asarray(shape) / np.asarray(DRAW_SHAPE)
    image = ndimage.zoom(image.astype(np.float32), factors, order=1)
    image += rng.normal(0, NOISE_HU, image.shape).astype(np.float32)
    label = ndimage.zoom(label, factors, order=0)
    fine_affine = affine @ np.diag(np.append(scale, 1.0))
    nib.save(
        nib.Nifti1Image(np.clip(np.rint(image), -1024, 3071).astype(np.int16), fine_affine),
        str(folder / "volume-0.nii"),
    )
    nib.save(nib.Nifti1Image(label.astype(np.uint8), fine_affine), str(folder / "segmentation-0.nii"))


def _peak_rss_mib() -> float:
    """This process's resident-set high-water mark (MiB)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / KIB_PER_MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB


def _preprocess_case(folder: Path) -> dict:
    import torchio  # noqa: F401  (imports count towards the baseline, not the case)

    from aqcf.data.cache import preprocess_case
    from aqcf.data.cohorts import read_lits
    from aqcf.data.preprocess import PreprocessSettings

    case = read_lits(folder)[0]
    rss_before = _peak_rss_mib()
    start = time.perf_counter()
    entry = preprocess_case(case, PreprocessSettings.default("ct"), folder / "cache")
    return {
        "seconds": time.perf_counter() - start,
        "rss_before_mib": rss_before,
        "peak_rss_mib": _peak_rss_mib(),
        "shape": entry["preprocessed_shape"],
    }


def _phantom_rows(quick: bool) -> list[dict]:
    """Seconds to draw one default-size CT phantom, the second of two draws (the first warms up)."""
    from aqcf.data.phantoms import ct_config, make_case

    config = ct_config()
    make_case(config, np.random.default_rng([0, 0, 0]))
    start = time.perf_counter()
    make_case(config, np.random.default_rng([0, 0, 1]))
    seconds = time.perf_counter() - start
    verdict = "within" if seconds < PHANTOM_BUDGET_S else "OVER"
    return [
        {
            "benchmark": "data",
            "case": f"phantom case, CT {'x'.join(map(str, config.shape))}",
            "metric": "draw time",
            "value": seconds,
            "unit": "s",
            "note": f"make_case after a warm-up draw; {verdict} the {PHANTOM_BUDGET_S:g} s budget",
        }
    ]


def _preprocess_rows(quick: bool) -> list[dict]:
    shape, spacing = (QUICK_SHAPE, QUICK_SPACING) if quick else (REALISTIC_SHAPE, REALISTIC_SPACING)
    with tempfile.TemporaryDirectory() as tmp:
        _write_ct_volume(Path(tmp), shape, spacing)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
    case = f"CT {'x'.join(map(str, shape))} at {'x'.join(map(str, spacing))} mm -> 1 mm"
    note = f"output {'x'.join(map(str, r['shape']))} voxels"
    return [
        {
            "benchmark": "data",
            "case": case,
            "metric": "preprocess time",
            "value": r["seconds"],
            "unit": "s",
            "note": note,
        },
        {
            "benchmark": "data",
            "case": case,
            "metric": "peak RSS",
            "value": r["peak_rss_mib"],
            "unit": "MiB",
            "note": f"fresh process; {r['rss_before_mib']:.0f} MiB after imports",
        },
    ]


def _loader_rows(quick: bool) -> list[dict]:
    from aqcf.data.datamodule import UnpairedDataModule
    from aqcf.data.phantoms import synthesize

    n_cases, n_batches = (5, 8) if quick else (8, 40)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp) / "phantoms", n_ct=n_cases, n_mri=n_cases, progress=False)
        start = time.perf_counter()
        for workers in (0, 2):
            dm = UnpairedDataModule(
                str(Path(tmp) / "phantoms" / "LiTS"),
                str(Path(tmp) / "phantoms" / "ATLAS"),
                cache_dir=str(Path(tmp) / "cache"),
                patch_size=PATCH,
                samples_per_volume=4,
                queue_length=16,
                num_workers=workers,
                progress=False,
            )
            dm.prepare_data()
            if workers == 0:
                prepare_s = time.perf_counter() - start
            dm.setup("fit")
            iterator = iter(dm.train_dataloader())
            next(iterator)  # first fill of both queues
            start = time.perf_counter()
            for _ in range(n_batches):
                try:
                    next(iterator)
                except StopIteration:
                    iterator = iter(dm.train_dataloader())
                    next(iterator)
            rate = n_batches / (time.perf_counter() - start)
            rows.append(
                {
                    "benchmark": "data",
                    "case": f"train batches, {workers} queue workers",
                    "metric": "throughput",
                    "value": rate,
                    "unit": "batches/s",
                    "note": f"1 CT + 1 MRI patch {'x'.join(map(str, PATCH))}, augmented; {n_batches} batches",
                }
            )
        rows.insert(
            0,
            {
                "benchmark": "data",
                "case": f"phantom cohort {n_cases} CT + {n_cases} MRI, 128x128x48",
                "metric": "preprocess time",
                "value": prepare_s / (2 * n_cases),
                "unit": "s/case",
                "note": "paper settings, 1 mm, one process",
            },
        )
    return rows


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows (see :mod:`benchmarks.run`)."""
    return _phantom_rows(quick) + _preprocess_rows(quick) + _loader_rows(quick)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help="folder holding volume-0.nii and segmentation-0.nii")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_preprocess_case(Path(args.case))))
    else:
        print(json.dumps(run(quick=True), indent=2))
