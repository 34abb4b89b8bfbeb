"""Model benchmark: one joint training step of A-QCF-Net, and quaternion vs real conv forward time.

Each training-step case runs in a fresh Python process (this file with ``--case``), so its peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the process high-water mark,
imports and weights included) belongs to that case alone. A step is the paper's Algorithm 2 on one
CT and one MRI patch of 256×256×16: forward, MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``
per stream summed, backward, AdamW step. With CUDA the step runs on the GPU under bf16 autocast (the
paper config's ``precision: bf16-mixed``) and the case also reports ``torch.cuda.max_memory_allocated``;
the paper-width step then runs a second time with every quaternion layer forced to the 8-multiplication
product (``quaternion_product="fast"``; ``auto`` is the dense product on a GPU), and the ratio of the
two is the whole-step measurement a CUDA rule for ``auto`` needs. On a CPU that comparison is
``benchmarks/bench_quaternion.py --train-step``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PATCH = (256, 256, 16)
TINY_WIDTHS = (2, 2, 4, 4, 8, 8)
PAPER_WIDTHS = (12, 24, 48, 96, 192, 256)
NUM_CLASSES = 3
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-5
# real channels, grid: a 3x3x3 conv of the second encoder level at the paper's widths (4 * 24)
CONV_CHANNELS = 96
CONV_GRID = (128, 128, 8)
CONV_REPEATS = 7
KIB_PER_MIB = 1024
STEP_METRIC = "step (median of warm steps)"


def _train_steps(widths: tuple[int, ...], steps: int, product: str = "auto") -> dict:
    from monai.losses import DiceCELoss

    from aqcf.networks.aqcfnet import AQCFNet, count_parameters

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = AQCFNet(num_classes=NUM_CLASSES, widths=widths, quaternion_product=product).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    ct, mri = torch.rand(1, 1, *PATCH, device=device), torch.rand(1, 1, *PATCH, device=device)
    y_ct = torch.randint(0, NUM_CLASSES, (1, 1, *PATCH), device=device)
    y_mri = torch.randint(0, NUM_CLASSES, (1, 1, *PATCH), device=device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits_ct, logits_mri = net(ct, mri)
            loss = loss_fn(logits_ct.float(), y_ct) + loss_fn(logits_mri.float(), y_mri)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    cuda = {"cuda_peak_mib": torch.cuda.max_memory_allocated() / KIB_PER_MIB**2} if device.type == "cuda" else {}
    return {
        **cuda,
        "device": str(device),
        "parameters": count_parameters(net),
        "first_step_s": times[0],
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "warm_steps": len(times) - 1,
        "rss_before_mib": rss_before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB,
        "threads": torch.get_num_threads(),
    }


def _run_case(widths: tuple[int, ...], steps: int, product: str = "auto") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", *map(str, widths), "--steps", str(steps)]
    cmd += ["--product", product]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train_rows(name: str, widths: tuple[int, ...], steps: int, product: str = "auto") -> list[dict]:
    r = _run_case(widths, steps, product)
    case = f"train step {name} widths {'-'.join(map(str, widths))}, CT+MRI {'x'.join(map(str, PATCH))}"
    if product != "auto":
        case += f", quaternion product {product}"
    note = "CUDA, bf16 autocast" if r["device"] == "cuda" else f"{r['threads']} torch threads"
    return [
        {
            "benchmark": "model",
            "case": case,
            "metric": "parameters",
            "value": r["parameters"],
            "unit": "count",
        },
        {
            "benchmark": "model",
            "case": case,
            "metric": "first step",
            "value": r["first_step_s"],
            "unit": "s",
            "note": note,
        },
        {
            "benchmark": "model",
            "case": case,
            "metric": STEP_METRIC,
            "value": r["step_s"],
            "unit": "s",
            "note": f"{note}, {r['warm_steps']} warm steps",
        },
        {
            "benchmark": "model",
            "case": case,
            "metric": "peak RSS",
            "value": r["peak_rss_mib"],
            "unit": "MiB",
            "note": f"ru_maxrss of a fresh process; {r['rss_before_mib']:.0f} MiB before the first step",
        },
    ] + ([{
        "benchmark": "model",
        "case": case,
        "metric": "CUDA peak memory",
        "value": r["cuda_peak_mib"],
        "unit": "MiB",
        "note": "torch.cuda.max_memory_allocated",
    }] if "cuda_peak_mib" in r else [])


def _forward_ms(layers: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, float]:
    """Median forward time per layer; the layers alternate so that load from other processes hits both."""
    times: dict[str, list[float]] = {name: [] for name in layers}
    with torch.no_grad():
        for layer in layers.values():
            layer(x)  # warm-up
        for _ in range(CONV_REPEATS):
            for name, layer in layers.items():
                start = time.perf_counter()
                layer(x)
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _conv_rows() -> list[dict]:
    from aqcf.nn.quaternion import QuaternionConv3d

    torch.manual_seed(0)
    x = torch.randn(1, CONV_CHANNELS, *CONV_GRID)
    quaternion = QuaternionConv3d(CONV_CHANNELS, CONV_CHANNELS, 3)
    real = torch.nn.Conv3d(CONV_CHANNELS, CONV_CHANNELS, 3, padding=1)
    t = _forward_ms({"quaternion": quaternion, "real": real}, x)
    t_q, t_r = t["quaternion"], t["real"]
    case = f"3x3x3 conv {CONV_CHANNELS}->{CONV_CHANNELS} real channels on {'x'.join(map(str, CONV_GRID))}"
    note = f"median of {CONV_REPEATS} interleaved runs, {torch.get_num_threads()} torch threads"
    rows = [
        ("QuaternionConv3d forward", t_q, "ms", note),
        ("nn.Conv3d forward", t_r, "ms", note),
        ("quaternion / real time", t_q / t_r, "ratio", "weight assembly (eq. 2) is the only extra work"),
    ]
    return [{"benchmark": "model", "case": case, "metric": m, "value": v, "unit": u, "note": n} for m, v, u, n in rows]


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows; ``quick`` skips the paper-width training step (minutes and ~11 GiB on a CPU)."""
    rows = _train_rows("tiny", TINY_WIDTHS, steps=2 if quick else 4)
    if not quick:
        rows += _train_rows("paper", PAPER_WIDTHS, steps=10 if torch.cuda.is_available() else 2)
    if not quick and torch.cuda.is_available():
        fast = _train_rows("paper", PAPER_WIDTHS, steps=10, product="fast")
        ratio = _step_s(fast) / _step_s(rows)
        rows += fast
        rows.append({"benchmark": "model", "case": "train step paper widths, fast / auto quaternion product",
                     "metric": "step ratio", "value": ratio, "unit": "ratio", "note": "auto is dense on a GPU"})
    return rows + _conv_rows()


def _step_s(rows: list[dict]) -> float:
    """The warm step time of the last training-step case in ``rows``."""
    return [r["value"] for r in rows if r["metric"] == STEP_METRIC][-1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one training-step case, printed as a JSON line")
    parser.add_argument("--case", type=int, nargs="+", required=True, help="widths")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--product", choices=("auto", "dense", "fast"), default="auto")
    args = parser.parse_args()
    print(json.dumps(_train_steps(tuple(args.case), args.steps, args.product)))
