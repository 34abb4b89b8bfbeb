"""Quaternion convolution benchmark: the dense (eq. 2) and the fast (8-multiplication) product.

For every quaternion layer shape of A-QCF-Net at the paper's widths on a 256×256×16 patch, it times
forward + backward (gradients w.r.t. the input and the weights) of ``nn.Conv3d`` (or
``nn.ConvTranspose3d``) of the same real shape, the dense quaternion path and the fast one, batch 1,
no bias. The shapes are found by running the network on PyTorch's ``meta`` device with forward hooks,
so the list follows the code; each case also counts how often a joint CT+MRI forward runs that shape.
The three variants alternate within every repeat so that load from other processes hits all of
them, and the median of the repeats is reported (``REPEATS``, fewer, down to ``MIN_REPEATS``, where
a round takes longer than ``ROUND_BUDGET_S / REPEATS``). ``auto`` runs exactly the code of the path
that :func:`~aqcf.nn.quaternion.resolve_product` picks, so its time is that path's time. A few probe
widths outside the network (``PROBE_SHAPES``) locate the thresholds of that rule.

The layers run on the GPU when there is one (``--device`` chooses), timed in float32 and in bfloat16
autocast (the paper config's ``bf16-mixed``; ``--precision`` chooses) with the device synchronised
around every run; on a CPU, in float32. On a CPU, grids of more than ``MAX_VOXELS`` input voxels (the
two finest levels) are timed on a crop, halving the larger in-plane axis until it fits: a narrow fast
path there takes minutes per run on the full grid, and a convolution's time grows in proportion to
its voxels. The summary scales such times back to the full grid. A fast path that takes more than
``SLOW_FACTOR`` times the dense path in the warm-up round is not repeated; its row says so.

The full table takes about 4 minutes on the 2-core development CPU. A whole training step at the
paper's widths on 256×256×16 patches, every quaternion layer forced dense against ``auto``, is a
separate command (``--train-step``): fresh processes in the order dense, auto, auto, dense, three
steps each (1.5 minutes a step there, about 30 minutes in all), so it stays out of ``run`` and
``benchmarks/run.py``.

Usage: ``python benchmarks/bench_quaternion.py [--quick | --train-step] [--device cpu|cuda] [--precision fp32 bf16]``
prints the rows as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

PAPER_WIDTHS = (12, 24, 48, 96, 192, 256)
PATCH = (256, 256, 16)
REPEATS = 5
QUICK_REPEATS = 3
MIN_REPEATS = 3
# repeats beyond MIN_REPEATS only while a round of the three variants stays within this budget
ROUND_BUDGET_S = 15.0
SLOW_FACTOR = 2.0
MAX_VOXELS = 32 * 64 * 16
# precisions timed per device type: bf16 is autocast, as the paper config's bf16-mixed
PRECISIONS = {"cuda": ("fp32", "bf16"), "cpu": ("fp32",)}
# widths outside the network that locate the auto rule's thresholds (FAST_* in aqcf/nn/quaternion.py)
PROBE_SHAPES = (
    ("conv", 16, 16, 3, 1, (64, 64, 4)),
    ("conv", 32, 32, 3, 1, (64, 64, 4)),
    ("conv", 40, 40, 3, 1, (64, 64, 4)),
    ("conv", 56, 56, 3, 1, (64, 64, 4)),
    ("conv", 64, 64, 3, 1, (64, 64, 4)),
    ("conv", 64, 64, 1, 1, (64, 64, 4)),
    ("conv", 128, 128, 1, 1, (32, 32, 2)),
    ("transposed", 16, 16, 2, 2, (64, 64, 4)),
    ("transposed", 64, 32, 2, 2, (32, 32, 2)),
    ("transposed", 128, 64, 2, 2, (32, 32, 2)),
)
# quick: a few shapes on small grids, on both sides of the auto rule
QUICK_SHAPES = (
    ("conv", 12, 12, 3, 1, (16, 16, 8)),
    ("conv", 96, 96, 3, 1, (8, 8, 4)),
    ("conv", 96, 96, 1, 1, (8, 8, 4)),
    ("transposed", 256, 96, 2, 2, (4, 4, 1)),
)
NUM_CLASSES = 3
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-5
# steps per process in --train-step; all but the first are timed (it pays page faults, primitive creation)
TRAIN_STEPS = 3


class LayerShape(NamedTuple):
    """One quaternion layer shape: ``kind`` is ``"conv"`` or ``"transposed"``; widths in quaternion channels.

    (A named tuple, not a dataclass: ``benchmarks/run.py`` loads this file without registering it as a module.)
    """

    kind: str
    q_in: int
    q_out: int
    kernel: int
    stride: int
    grid: tuple[int, int, int]
    # larger grids are timed on a crop; None times every grid whole (on a GPU)
    max_voxels: int | None = MAX_VOXELS

    @property
    def timed_grid(self) -> tuple[int, int, int]:
        """``grid``, with the larger in-plane axis halved until at most ``max_voxels`` voxels remain."""
        x, y, z = self.grid
        while self.max_voxels is not None and x * y * z > self.max_voxels and max(x, y) > 1:
            x, y = (x // 2, y) if x >= y else (x, y // 2)
        return x, y, z

    @property
    def crop_factor(self) -> float:
        """Voxels of ``grid`` per voxel of ``timed_grid``."""
        return math.prod(self.grid) / math.prod(self.timed_grid)

    def label(self) -> str:
        name = "QConv3d" if self.kind == "conv" else "QConvTranspose3d"
        text = f"{name} {self.q_in}->{self.q_out} k{self.kernel} s{self.stride} on {_size(self.grid)} input"
        return text if self.crop_factor == 1 else f"{text} (timed on {_size(self.timed_grid)})"


def _size(grid: tuple[int, ...]) -> str:
    return "x".join(map(str, grid))


def network_shapes(widths: tuple[int, ...] = PAPER_WIDTHS, patch: tuple[int, ...] = PATCH) -> Counter[LayerShape]:
    """Every quaternion layer shape of ``AQCFNet(widths=widths)`` on ``patch``, with its count per joint forward."""
    from aqcf.networks.aqcfnet import AQCFNet
    from aqcf.nn.quaternion import QuaternionConv3d, QuaternionConvTranspose3d

    shapes: Counter[LayerShape] = Counter()

    def record(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        kind = "transposed" if isinstance(module, QuaternionConvTranspose3d) else "conv"
        grid = tuple(args[0].shape[2:])
        shapes[LayerShape(kind, module.q_in, module.q_out, module.kernel_size[0], module.stride[0], grid)] += 1

    with torch.device("meta"):
        net = AQCFNet(widths=widths)
        for module in net.modules():
            if isinstance(module, (QuaternionConv3d, QuaternionConvTranspose3d)):
                module.register_forward_hook(record)
        x = torch.empty(1, 1, *patch)
        net(x, x)
    return shapes


def _quaternion_layer(shape: LayerShape, product: str) -> nn.Module:
    from aqcf.nn.quaternion import QuaternionConv3d, QuaternionConvTranspose3d

    layer = QuaternionConv3d if shape.kind == "conv" else QuaternionConvTranspose3d
    return layer(4 * shape.q_in, 4 * shape.q_out, shape.kernel, stride=shape.stride, bias=False, product=product)


def _layers(shape: LayerShape) -> dict[str, nn.Module]:
    from aqcf.nn.quaternion import DENSE, FAST

    c_in, c_out, k, s = 4 * shape.q_in, 4 * shape.q_out, shape.kernel, shape.stride
    if shape.kind == "conv":
        real = nn.Conv3d(c_in, c_out, k, stride=s, padding=k // 2, bias=False)
    else:
        real = nn.ConvTranspose3d(c_in, c_out, k, stride=s, bias=False)
    return {"real": real, DENSE: _quaternion_layer(shape, DENSE), FAST: _quaternion_layer(shape, FAST)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_once(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, precision: str) -> float:
    x.grad = None
    layer.zero_grad(set_to_none=True)
    _synchronize(x.device)
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = layer(x)
    out.backward(grad.to(out.dtype))
    _synchronize(x.device)
    return time.perf_counter() - start


def time_shape(
    shape: LayerShape, repeats: int, device: torch.device | str = "cpu", precision: str = "fp32"
) -> dict[str, dict]:
    """Forward + backward seconds of the three variants, interleaved: ``{name: {"s": median, "runs": n}}``."""
    device = torch.device(device)
    torch.manual_seed(0)
    layers = {name: layer.to(device) for name, layer in _layers(shape).items()}
    x = torch.randn(1, 4 * shape.q_in, *shape.timed_grid, device=device, requires_grad=True)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        grad = torch.randn_like(layers["real"](x))
    times: dict[str, list[float]] = {name: [_step_once(layer, x, grad, precision)] for name, layer in layers.items()}
    warm_round = sum(t[0] for t in times.values())
    active = [name for name in layers if not (name == "fast" and times["fast"][0] > SLOW_FACTOR * times["dense"][0])]
    repeats = max(MIN_REPEATS, min(repeats, int(ROUND_BUDGET_S / warm_round)))
    for name in active:
        times[name] = []
    for _ in range(repeats):
        for name in active:
            times[name].append(_step_once(layers[name], x, grad, precision))
    return {name: {"s": statistics.median(t), "runs": len(t)} for name, t in times.items()}


def _as_rows(case: str, rows: list[tuple]) -> list[dict]:
    return [
        {"benchmark": "quaternion", "case": case, "metric": m, "value": v, "unit": u, "note": n} for m, v, u, n in rows
    ]


def _auto(shape: LayerShape, device_type: str) -> str:
    """The path an ``auto`` layer of ``shape`` takes on ``device_type``, as the layer itself resolves it."""
    from aqcf.nn.quaternion import AUTO

    with torch.device("meta"):
        return _quaternion_layer(shape, AUTO).resolved_product(device_type)


def _where(device: torch.device, precision: str) -> str:
    """How the rows of one device and precision are told apart: nothing on a CPU in float32."""
    return "" if (device.type, precision) == ("cpu", "fp32") else f", {device.type} {precision}"


def _rows_for(
    shape: LayerShape, count: int, measured: dict[str, dict], device: torch.device, precision: str
) -> list[dict]:
    auto = _auto(shape, device.type)
    ms = {name: 1e3 * m["s"] for name, m in measured.items()}
    reference = "nn.Conv3d" if shape.kind == "conv" else "nn.ConvTranspose3d"
    label = shape.label() + _where(device, precision)
    case = f"{label} (x{count} per joint forward)" if count else f"{label} (probe, not in the network)"
    runs = {name: m["runs"] for name, m in measured.items()}
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} torch threads"
    note = f"fwd+bwd, median of {runs['real']} interleaved runs, {on}, {precision}"
    fast_note = note if runs["fast"] == runs["real"] else f"one run: over {SLOW_FACTOR:g}x dense, not repeated"
    rows = [
        (f"{reference} fwd+bwd", ms["real"], "ms", note),
        ("dense quaternion fwd+bwd", ms["dense"], "ms", note),
        ("fast quaternion fwd+bwd", ms["fast"], "ms", fast_note),
        (f"dense / {reference}", ms["dense"] / ms["real"], "ratio", ""),
        (f"fast / {reference}", ms["fast"] / ms["real"], "ratio", ""),
        (f"auto / {reference}", ms[auto] / ms["real"], "ratio", f"auto = {auto} on {device.type}"),
    ]
    return _as_rows(case, rows)


def _summary_rows(results: list[tuple[LayerShape, int, dict[str, dict]]], case: str, device_type: str) -> list[dict]:
    """Per joint forward, weighted by layer counts; and the worst auto / dense over all shapes.

    The fast path's sum is there too: on a GPU, where auto is dense, it is what a CUDA rule would weigh.
    """
    total = {"real": 0.0, "dense": 0.0, "fast": 0.0, "auto": 0.0}
    worst = 0.0
    for shape, count, measured in results:
        if not count:
            continue
        auto = _auto(shape, device_type)
        weight = count * shape.crop_factor
        for name in ("real", "dense", "fast"):
            total[name] += weight * measured[name]["s"]
        total["auto"] += weight * measured[auto]["s"]
        worst = max(worst, measured[auto]["s"] / measured["dense"]["s"])
    rows = [
        ("real convs of the same shapes", total["real"], "s", ""),
        ("dense quaternion", total["dense"], "s", ""),
        ("fast quaternion, every layer", total["fast"], "s", "slow fast paths timed once"),
        ("auto quaternion", total["auto"], "s", f"auto as resolved on {device_type}"),
        ("auto / dense", total["auto"] / total["dense"], "ratio", "the convolution part of a step only"),
        ("fast / dense", total["fast"] / total["dense"], "ratio", "every layer forced fast"),
        ("worst auto / dense over the shapes", worst, "ratio", "1 where auto is dense (the same timings)"),
    ]
    return _as_rows(case, rows)


def _train_step(widths: tuple[int, ...], product: str, steps: int = TRAIN_STEPS) -> dict:
    """Joint training steps (as ``bench_model``: forward, DiceCE per stream, backward, AdamW) on CPU.

    Returns the median time of the steps after the first (which pays page faults and oneDNN's
    primitive creation; the first itself if ``steps`` is 1) and the time of every step.
    """
    from monai.losses import DiceCELoss

    from aqcf.networks.aqcfnet import AQCFNet

    torch.manual_seed(0)
    net = AQCFNet(num_classes=NUM_CLASSES, widths=widths, quaternion_product=product)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    ct, mri = torch.rand(1, 1, *PATCH), torch.rand(1, 1, *PATCH)
    y_ct, y_mri = torch.randint(0, NUM_CLASSES, (1, 1, *PATCH)), torch.randint(0, NUM_CLASSES, (1, 1, *PATCH))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits_ct, logits_mri = net(ct, mri)
        loss = loss_fn(logits_ct, y_ct) + loss_fn(logits_mri, y_mri)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[1:] or times), "steps_s": times, "threads": torch.get_num_threads()}


def train_step_rows(widths: tuple[int, ...] = PAPER_WIDTHS, rounds: int = 1, steps: int = TRAIN_STEPS) -> list[dict]:
    """Training steps with every quaternion layer dense and with ``auto``, each product in fresh processes.

    One round is two processes, ``dense`` then ``auto``; further rounds alternate the order (dense,
    auto, auto, dense, ...), so that a load that drifts over the run hits both products alike. Each
    process takes ``steps`` steps and reports the median of all but the first; the ratio is that of the
    means over the processes.
    """
    order = [p for n in range(rounds) for p in (("dense", "auto") if n % 2 == 0 else ("auto", "dense"))]
    timed: dict[str, list[float]] = {"dense": [], "auto": []}
    threads = 0
    for product in order:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", product, "--steps", str(steps)]
        done = subprocess.run([*cmd, "--widths", *map(str, widths)], capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        timed[product].append(result["step_s"])
        threads = result["threads"]
        each_step = ", ".join(f"{t:.1f}" for t in result["steps_s"])
        print(f"[quaternion] train steps {product}: {each_step} s", file=sys.stderr, flush=True)
    case = f"train step widths {'-'.join(map(str, widths))}, CT+MRI {'x'.join(map(str, PATCH))}, CPU"
    each = ", ".join(f"{name} " + " / ".join(f"{t:.1f}" for t in times) + " s" for name, times in timed.items())
    timed_steps = f"median of steps 2-{steps}" if steps > 1 else "its one step"
    note = f"{timed_steps} in a fresh process, mean of {rounds} process(es) per product, "
    note += f"order {'-'.join(order)}, {threads} torch threads; per process: {each}"
    dense, auto = statistics.mean(timed["dense"]), statistics.mean(timed["auto"])
    rows = [
        ("step, every quaternion layer dense", dense, "s", note),
        ("step, auto", auto, "s", note),
        ("auto / dense", auto / dense, "ratio", note),
    ]
    return _as_rows(case, rows)


NETWORK_SUM = "all network layers, summed with their counts per joint CT+MRI forward, crops scaled to the full grid"


def run(quick: bool = False, device: str | None = None, precisions: tuple[str, ...] | None = None) -> list[dict]:
    """Per-layer benchmark rows; ``quick`` times a few shapes on small grids.

    ``device`` defaults to CUDA when there is one, ``precisions`` to ``PRECISIONS`` of its type.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precisions = precisions or PRECISIONS[device.type]
    if quick:
        shapes = Counter({LayerShape(*s): 1 for s in QUICK_SHAPES})
    else:
        shapes = network_shapes()
        shapes.update({LayerShape(*s): 0 for s in PROBE_SHAPES})
    if device.type != "cpu":
        shapes = Counter({shape._replace(max_voxels=None): n for shape, n in shapes.items()})
    ordered = sorted(shapes, key=lambda s: (s.kind, s.kernel, min(s.q_in, s.q_out), s.q_in, s.q_out, s.grid))
    rows: list[dict] = []
    for precision in precisions:
        results = []
        for shape in ordered:
            measured = time_shape(shape, QUICK_REPEATS if quick else REPEATS, device, precision)
            results.append((shape, shapes[shape], measured))
            rows += _rows_for(shape, shapes[shape], measured, device, precision)
            times = ", ".join(f"{n} {1e3 * m['s']:.1f} ms" for n, m in measured.items())
            print(f"[quaternion] {shape.label()}{_where(device, precision)}: {times}", file=sys.stderr, flush=True)
        case = "the quick shapes, one of each" if quick else NETWORK_SUM
        rows += _summary_rows(results, case + _where(device, precision), device.type)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="quaternion convolution benchmark, rows as JSON lines")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train-step", action="store_true", help="paper-width training step, dense vs auto")
    parser.add_argument("--step", choices=("dense", "fast", "auto"), help="time one training step (internal)")
    parser.add_argument("--widths", type=int, nargs="+", default=list(PAPER_WIDTHS))
    parser.add_argument("--rounds", type=int, default=2, help="--train-step: rounds of one dense + one auto process")
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS,
                        help="--train-step: steps per process, all but the first timed")
    parser.add_argument("--device", help="the layer table's device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"),
                        help="the layer table's precisions (default: fp32 and bf16 on cuda, fp32 on cpu)")
    args = parser.parse_args()
    if args.step:
        print(json.dumps(_train_step(tuple(args.widths), args.step, args.steps)))
    elif args.train_step:
        for row in train_step_rows(tuple(args.widths), args.rounds, args.steps):
            print(json.dumps(row))
    else:
        for row in run(quick=args.quick, device=args.device, precisions=tuple(args.precision or ()) or None):
            print(json.dumps(row))
