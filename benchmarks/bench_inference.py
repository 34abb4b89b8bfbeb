"""Inference benchmark: ``aqcf segment`` of one realistic CT volume, against a plain MONAI sliding window.

The volume is a LiTS-sized CT phantom (512×512×200 voxels at 0.8×0.8×2.5 mm, int16 HU; drawn at
128×128×50 and upsampled, which costs the pipeline the same as a native draw). The network has the demo
widths (``configs/demo.yaml``; (4, 8, 16, 32, 64, 64) if that file is absent) with random weights, saved as
an ``aqcf fit``-style checkpoint with the paper's inference settings: 1 mm preprocessing, window 256×256×16,
Gaussian blending, overlap 0.5 and 0.8.

A full run on a CPU is hours (hundreds to a thousand windows of 1 M voxels each), so the figures are
assembled from parts that are each measured, every part in a fresh process (this file with ``--case``) so
that its peak resident set size (``VmHWM``, imports included) is its own:

1. ``window``: seconds per 256×256×16 window through the network, for the unimodal path ``aqcf segment``
   runs (``forward_single``, eq. 17) and for the full zero-filled dual-stream graph a plain MONAI call runs
   (``lambda x: net(x, torch.zeros_like(x))[0]``), and the memory one window's activations add.
2. ``pipeline``: the real ``aqcf segment`` command on the full volume (reading, preprocessing, MONAI
   sliding-window stitching, argmax, restoring to the original grid, writing the mask, measures, JSON) with
   the network's forward replaced by a stand-in that returns zeros at once; it counts the windows. This is
   everything but the network, and the same MONAI call a plain sliding window makes.
3. Extrapolated totals: ``aqcf segment`` = pipeline + windows × unimodal window time; plain MONAI =
   its stitching (the pipeline's inference stage) + windows × dual-graph window time. Peak memory: at most
   the pipeline's peak plus one window's activations.
4. ``slab`` (not with ``--quick``): the real ``aqcf segment`` with the real network on a 6-slice slab of
   the volume, beside the time the same model predicts for it, to check the extrapolation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
FALLBACK_WIDTHS = (4, 8, 16, 32, 64, 64)
TINY_WIDTHS = (2, 2, 4, 4, 8, 8)
SHAPE, SPACING = (512, 512, 200), (0.8, 0.8, 2.5)
QUICK_SHAPE, QUICK_SPACING = (128, 128, 50), (3.2, 3.2, 10.0)
DRAW_SHAPE = (128, 128, 50)
NOISE_HU = 12.0
HU_RANGE = (-1024, 3071)
PATCH = (256, 256, 16)
QUICK_PATCH = (64, 64, 16)
PAPER_PREPROCESS_SPACING = (1.0, 1.0, 1.0)
QUICK_PREPROCESS_SPACING = (4.0, 4.0, 4.0)
OVERLAPS = (0.5, 0.8)
SLAB_SLICES = 6
WINDOW_REPEATS = 2
NUM_CLASSES = 3
KIB_PER_MIB = 1024


def demo_widths() -> tuple[int, ...]:
    """The network widths of ``configs/demo.yaml``, or :data:`FALLBACK_WIDTHS`."""
    import yaml

    if DEMO_CONFIG.is_file():
        config = yaml.safe_load(DEMO_CONFIG.read_text())
        widths = config.get("model", {}).get("network", {}).get("init_args", {}).get("widths")
        if widths:
            return tuple(int(w) for w in widths)
    return FALLBACK_WIDTHS


def _peak_rss_mib() -> float:
    """``VmHWM`` of this process (``ru_maxrss`` would carry the parent's peak over across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / KIB_PER_MIB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB


def write_volume(path: Path, shape, spacing) -> None:
    """A CT phantom of ``shape`` voxels at ``spacing`` mm (HU, int16) saved as NIfTI."""
    import nibabel as nib
    from scipy import ndimage

    from aqcf.data.phantoms import ct_config, make_case

    # scipy's zoom maps the first and last voxel centres onto each other: scale the grid accordingly
    scale = (np.asarray(DRAW_SHAPE) - 1) / (np.asarray(shape) - 1)
    rng = np.random.default_rng(0)
    image, _, affine = make_case(ct_config(shape=DRAW_SHAPE, spacing=tuple(np.asarray(spacing) / scale)), rng)
    image = ndimage.zoom(image.astype(np.float32), np.asarray(shape) / np.asarray(DRAW_SHAPE), order=1)
    image += rng.normal(0, NOISE_HU, image.shape).astype(np.float32)
    image = np.clip(np.rint(image), *HU_RANGE).astype(np.int16)
    nib.save(nib.Nifti1Image(image, affine @ np.diag(np.append(scale, 1.0))), str(path))


def write_checkpoint(path: Path, widths, patch, overlap: float, spacing=PAPER_PREPROCESS_SPACING) -> None:
    """An ``aqcf fit``-style checkpoint of a randomly initialised AQCFNet with the given settings."""
    import lightning
    import torch

    from aqcf.networks.aqcfnet import AQCFNet

    torch.manual_seed(0)
    net = AQCFNet(num_classes=NUM_CLASSES, widths=widths)
    checkpoint = {
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": {f"network.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": {
            "network": {"class_path": "aqcf.networks.aqcfnet.AQCFNet", "init_args": {"widths": list(widths)}},
            "patch_size": list(patch),
            "sw_overlap": overlap,
            "sw_batch_size": 1,
            "sw_mode": "gaussian",
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
        },
        "datamodule_hyper_parameters": {
            "ct_root": "data/LiTS",
            "mri_root": "data/ATLAS",
            "patch_size": list(patch),
            "ct_spacing": list(spacing),
            "mri_spacing": list(spacing),
        },
    }
    torch.save(checkpoint, path)


# ------------------------------------------------------------------------------------------- cases
def _case_window(widths, patch) -> dict:
    import torch

    from aqcf.networks.aqcfnet import AQCFNet

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = AQCFNet(num_classes=NUM_CLASSES, widths=widths).to(device).eval()
    x = torch.rand(1, 1, *patch, device=device)
    paths = {"unimodal": lambda: net.forward_single(x, "ct"), "dual": lambda: net(x, torch.zeros_like(x))[0]}
    result = {"device": str(device), "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for name, forward in paths.items():
            before = _peak_rss_mib()
            forward()  # warm-up; also the activation high-water mark
            result[f"{name}_activation_mib"] = _peak_rss_mib() - before
            times = []
            for _ in range(WINDOW_REPEATS):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                forward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            result[f"{name}_s"] = float(np.median(times))
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / KIB_PER_MIB**2
    return result


def _case_segment(volume: str, ckpt: str, out: str, overlap: float, null_network: bool) -> dict:
    import torch

    from aqcf.cli import main
    from aqcf.networks.aqcfnet import AQCFNet

    windows = [0]
    if null_network:
        # stand-in for the network: the rest of `aqcf segment` runs as shipped
        def forward_single(self, x, modality):
            windows[0] += x.shape[0]
            return torch.zeros(x.shape[0], self.num_classes, *x.shape[2:], device=x.device)

        AQCFNet.forward_single = forward_single
    start = time.perf_counter()
    args = ["segment", volume, "--modality", "ct", "--ckpt", ckpt, "--out", out, "--overlap", str(overlap),
            "--sw-batch-size", "1", "--no-progress", "--overwrite"]
    if main(args) != 0:
        raise RuntimeError("aqcf segment failed")
    wall = time.perf_counter() - start
    record = json.loads(next(Path(out).glob("*.json")).read_text())
    return {"wall_s": wall, "stages_s": record["seconds"], "windows": windows[0], "peak_rss_mib": _peak_rss_mib()}


def _run_case(*args: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------- rows
def _row(case: str, metric: str, value, unit: str, note: str = "") -> dict:
    return {"benchmark": "inference", "case": case, "metric": metric, "value": value, "unit": unit, "note": note}


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring).

    ``quick``: a 128×128×50 volume preprocessed at 4 mm, tiny widths, 64×64×16 windows, no slab check.
    """
    widths = TINY_WIDTHS if quick else demo_widths()
    patch, shape, spacing = (QUICK_PATCH, QUICK_SHAPE, QUICK_SPACING) if quick else (PATCH, SHAPE, SPACING)
    preprocess_spacing = QUICK_PREPROCESS_SPACING if quick else PAPER_PREPROCESS_SPACING
    grid = "x".join(map(str, shape))
    size = f"{grid} at {'x'.join(map(str, spacing))} mm"
    net = f"widths {'-'.join(map(str, widths))}, window {'x'.join(map(str, patch))}"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="aqcf-bench-") as tmp:
        tmp = Path(tmp)
        volume = tmp / "ct.nii.gz"
        write_volume(volume, shape, spacing)
        ckpt = tmp / "demo.ckpt"
        write_checkpoint(ckpt, widths, patch, OVERLAPS[0], preprocess_spacing)

        w = _run_case("window", ",".join(map(str, widths)), ",".join(map(str, patch)))
        hw = f"{w['device']}, {w['threads']} torch threads, median of {WINDOW_REPEATS}"
        case = f"one window, {net}"
        rows += [
            _row(case, "unimodal path (forward_single)", w["unimodal_s"], "s", hw),
            _row(case, "zero-filled dual graph", w["dual_s"], "s", hw),
            _row(case, "activations of one window (unimodal)", w["unimodal_activation_mib"], "MiB", "VmHWM increase"),
        ]
        if "cuda_peak_mib" in w:
            rows.append(_row(case, "CUDA peak memory", w["cuda_peak_mib"], "MiB"))

        for overlap in OVERLAPS:
            p = _run_case("segment", str(volume), str(ckpt), str(tmp / f"out{overlap}"), str(overlap), "null")
            stages = p["stages_s"]
            stitch = stages["inference"]
            n = p["windows"]
            case = f"aqcf segment CT {size}, {net}, overlap {overlap}"
            segment_s = stages["total"] + n * w["unimodal_s"]
            plain_s = stitch + n * w["dual_s"]
            peak = p["peak_rss_mib"] + w["unimodal_activation_mib"]
            rows += [
                _row(case, "windows", n, "count"),
                _row(case, "preprocess (read, reorient, crop, resample, window, pad)", stages["preprocess"], "s"),
                _row(case, "stitching without the network (MONAI Gaussian blending, argmax)", stitch, "s"),
                _row(case, "restore to original grid", stages["restore"], "s"),
                _row(case, "pipeline total without the network (incl. mask, measures, JSON)", stages["total"], "s"),
                _row(case, "peak RSS without the network", p["peak_rss_mib"], "MiB", "fresh process, imports included"),
                _row(case, "aqcf segment total", segment_s, "s", "extrapolated: pipeline + windows x unimodal window"),
                _row(case, "plain MONAI sliding window, dual graph", plain_s, "s",
                     "extrapolated: stitching + windows x dual-graph window"),
                _row(case, "aqcf segment / plain MONAI time", segment_s / plain_s, "ratio", "extrapolated"),
                _row(case, "aqcf segment peak RSS", peak, "MiB",
                     "upper bound: pipeline peak + one window's activations"),
            ]

        if not quick:
            slab = tmp / "slab.nii.gz"
            import nibabel as nib

            image = nib.load(volume)
            middle = image.shape[2] // 2
            nib.save(image.slicer[:, :, middle : middle + SLAB_SLICES], str(slab))
            null = _run_case("segment", str(slab), str(ckpt), str(tmp / "slab_null"), str(OVERLAPS[0]), "null")
            real = _run_case("segment", str(slab), str(ckpt), str(tmp / "slab_real"), str(OVERLAPS[0]), "real")
            predicted = null["stages_s"]["total"] + null["windows"] * w["unimodal_s"]
            case = f"aqcf segment CT slab {shape[0]}x{shape[1]}x{SLAB_SLICES}, {net}, overlap {OVERLAPS[0]}"
            rows += [
                _row(case, "windows", null["windows"], "count"),
                _row(case, "aqcf segment total, measured", real["stages_s"]["total"], "s", "real network"),
                _row(case, "aqcf segment total, extrapolation model", predicted, "s", "pipeline + windows x window"),
                _row(case, "peak RSS, measured", real["peak_rss_mib"], "MiB"),
            ]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one inference benchmark case, printed as a JSON line")
    parser.add_argument("--case", nargs="+", required=True,
                        help="window WIDTHS PATCH | segment VOLUME CKPT OUT OVERLAP null|real")
    cli = parser.parse_args()
    kind, *rest = cli.case
    if kind == "window":
        result = _case_window(tuple(map(int, rest[0].split(","))), tuple(map(int, rest[1].split(","))))
    else:
        volume, ckpt, out, overlap, network = rest
        result = _case_segment(volume, ckpt, out, float(overlap), null_network=network == "null")
    print(json.dumps(result))
