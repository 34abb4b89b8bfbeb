"""Export benchmark: the unimodal network in PyTorch (eager) against its ONNX export in onnxruntime, on the CPU.

The network has the demo widths (``configs/demo.yaml``: (2, 4, 8, 16, 32, 32)) with weights from a fixed
seed (no training: the cost does not depend on the weights), exported by ``aqcf export``'s code
(:func:`aqcf.inference.export.export_network`, CT). Two cases, each timed old and new interleaved (the
median of the repeats; the CPU is shared):

1. ``window``: one 32×32×32 window (the demo's patch), and a batch of 4 (one sliding-window call).
2. ``scan``: a demo-scale CT phantom (128×128×48 voxels at 2×2×3 mm) preprocessed as the demo trains
   (4×4×6 mm, body crop, padding to 16), then MONAI ``sliding_window_inference`` with the demo's
   settings (window 32³, overlap 0.5, Gaussian blending, 4 windows a batch) over each predictor.

Both runtimes get the same number of threads (``THREADS``, default 1: on the 2-core development machine
two threads were slower under contention). Rows also give the export time and the largest difference
of the two outputs.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
DEMO_CONFIG = HERE.parent / "configs" / "demo.yaml"
FALLBACK_WIDTHS = (2, 4, 8, 16, 32, 32)
THREADS = int(os.environ.get("AQCF_BENCH_THREADS", "1"))
WINDOW = (32, 32, 32)
OVERLAP, SW_BATCH, BLEND = 0.5, 4, "gaussian"
PHANTOM_SHAPE, QUICK_PHANTOM_SHAPE = (128, 128, 48), (64, 64, 24)
DEMO_SPACING = (4.0, 4.0, 6.0)
REPEATS, QUICK_REPEATS = 7, 2
SEED = 0


def _demo_widths() -> tuple[int, ...]:
    if DEMO_CONFIG.is_file():
        config = yaml.safe_load(DEMO_CONFIG.read_text())
        return tuple(config["model"]["network"]["init_args"]["widths"])
    return FALLBACK_WIDTHS


def _interleaved(functions: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times after one warm-up call each."""
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _rows(case: str, seconds: dict[str, float], difference: float, note: str) -> list[dict]:
    base = {"benchmark": "export", "case": case}
    return [
        {**base, "metric": "PyTorch eager", "value": seconds["torch"], "unit": "s", "note": note},
        {**base, "metric": "onnxruntime", "value": seconds["onnxruntime"], "unit": "s", "note": note},
        {**base, "metric": "PyTorch / onnxruntime", "value": seconds["torch"] / seconds["onnxruntime"], "unit": "x",
         "note": "> 1: onnxruntime faster"},
        {**base, "metric": "max abs logit difference", "value": difference, "unit": "logit", "note": ""},
    ]


def _phantom_volume(shape: tuple[int, int, int], folder: Path) -> torch.Tensor:
    from aqcf.data.phantoms import ct_config, synthesize
    from aqcf.data.preprocess import PreprocessSettings, preprocess_image

    synthesize(folder, n_ct=1, n_mri=0, ct=ct_config(shape=shape), seed=SEED, progress=False)
    scan = next((folder / "LiTS").rglob("volume-*.nii*"))
    image, _ = preprocess_image(scan, PreprocessSettings.default("ct", spacing=DEMO_SPACING))
    return image[None]


def run(quick: bool = False) -> list[dict]:
    from monai.inferers import sliding_window_inference

    from aqcf.inference.export import export_network, onnx_window_predictor
    from aqcf.networks.aqcfnet import AQCFNet

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    widths = _demo_widths()
    network = AQCFNet(widths=widths).eval()
    repeats = QUICK_REPEATS if quick else REPEATS
    note = f"widths {list(widths)}, {THREADS} thread(s) each, median of {repeats}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "ct.onnx"
        start = time.perf_counter()
        export_network(network, "ct", model, "onnx")
        rows.append({"benchmark": "export", "case": "aqcf export (ONNX, CT)", "metric": "export time",
                     "value": time.perf_counter() - start, "unit": "s", "note": f"widths {list(widths)}"})
        onnx_predict = onnx_window_predictor(model, threads=THREADS)

        def torch_predict(x: torch.Tensor) -> torch.Tensor:
            # no_grad, not inference_mode: MONAI updates its buffers in place outside the predictor
            with torch.no_grad():
                return network.forward_single(x, "ct")

        for batch in (1, SW_BATCH):
            window = torch.rand(batch, 1, *WINDOW, generator=torch.Generator().manual_seed(SEED))
            seconds = _interleaved({"torch": lambda w=window: torch_predict(w),
                                    "onnxruntime": lambda w=window: onnx_predict(w)}, repeats)
            difference = float((torch_predict(window) - onnx_predict(window)).abs().max())
            rows += _rows(f"{batch} window(s) {'x'.join(map(str, WINDOW))} in one call", seconds, difference, note)

        shape = QUICK_PHANTOM_SHAPE if quick else PHANTOM_SHAPE
        volume = _phantom_volume(shape, Path(tmp) / "phantom")

        def whole(predictor):
            return sliding_window_inference(volume, WINDOW, SW_BATCH, predictor, overlap=OVERLAP, mode=BLEND)

        seconds = _interleaved({"torch": lambda: whole(torch_predict), "onnxruntime": lambda: whole(onnx_predict)},
                               repeats)
        difference = float((whole(torch_predict) - whole(onnx_predict)).abs().max())
        grid = "x".join(map(str, volume.shape[2:]))
        scan = "x".join(map(str, shape))
        rows += _rows(f"demo scan {scan} at 2x2x3 mm -> {grid} at 4x4x6 mm, sliding window", seconds, difference,
                      f"{note}; overlap {OVERLAP}, {SW_BATCH} windows a batch, {BLEND}")
    return rows


if __name__ == "__main__":
    for row in run(quick=bool(os.environ.get("QUICK"))):
        print(row)
