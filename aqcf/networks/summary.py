"""``aqcf summary``: parameter counts of A-QCF-Net per part, beside the paper's 31.5 M.

The networks are built on PyTorch's ``meta`` device (shapes only, no memory, no initialisation cost),
so the paper-sized network and its real-valued twin are counted in about a second.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import nn

from aqcf.cli import ArgumentParser
from aqcf.networks.aqcfnet import (
    BOTTLENECKS,
    PAPER_PARAMETERS,
    PAPER_WIDTHS,
    SHARED,
    AQCFNet,
    count_parameters,
)
from aqcf.nn.blocks import ALGEBRAS, QUATERNION, REAL
from aqcf.nn.fusion import ADAPTIVE, GATES

__all__ = ["parameter_table", "format_table", "main"]


def _build(**kwargs) -> AQCFNet:
    with torch.device("meta"):
        return AQCFNet(**kwargs)


def _attention_gates(net: AQCFNet) -> list[nn.Module]:
    return [stage.attention_gate for d in net.decoders.values() for stage in d.stages if stage.attention_gate]


def _parts(net: AQCFNet) -> list[tuple[str, int]]:
    rows = [
        ("stems (CT + MRI)", count_parameters(net.stems)),
        ("encoders (CT + MRI)", count_parameters(net.encoders)),
    ]
    fusion = net.fusion if net.fusion is not None else []
    rows.append(("A-QCF fusion blocks", sum(count_parameters(b) for b in fusion)))
    rows += [(f"  stage {s + 1}", count_parameters(b)) for s, b in enumerate(fusion)]
    shared = "shared" if net.bottleneck_mode == SHARED else "separate"
    rows.append((f"bottleneck ({shared})", count_parameters(net.bottleneck)))
    rows.append(("decoders (CT + MRI)", count_parameters(net.decoders)))
    rows.append(("  of which attention gates", sum(count_parameters(g) for g in _attention_gates(net))))
    rows.append(("heads (CT + MRI)", count_parameters(net.heads)))
    rows.append(("total", count_parameters(net)))
    return rows


def parameter_table(**kwargs) -> list[tuple[str, int, int]]:
    """Rows ``(part, parameters, parameters of the real-valued network of the same real widths)``.

    Args:
        **kwargs: :class:`AQCFNet` arguments.
    """
    net = _build(**kwargs)
    real = _build(**{**kwargs, "algebra": REAL})
    return [(name, n, n_real) for (name, n), (_, n_real) in zip(_parts(net), _parts(real), strict=True)]


def format_table(rows: Sequence[tuple[str, int, int]], title: str) -> str:
    """A plain-text table of :func:`parameter_table` rows and the paper's figure."""
    lines = [title, f"{'part':<28}{'parameters':>15}{'real-valued equivalent':>26}"]
    lines += [f"{name:<28}{n:>15,}{n_real:>26,}" for name, n, n_real in rows]
    ratio = rows[-1][1] / PAPER_PARAMETERS
    lines.append(f"{'paper (section 4.1.4)':<28}{int(PAPER_PARAMETERS):>15,}   (this network: {ratio:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="aqcf summary", description=__doc__)
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=list(PAPER_WIDTHS),
        help="quaternion channels: stem, downsampling stages, bottleneck (default: %(default)s)",
    )
    parser.add_argument("--in-channels", type=int, default=1, help="image channels (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=3, help="output classes (default: %(default)s)")
    parser.add_argument("--gate", choices=GATES, default=ADAPTIVE, help="A-QCF gate (default: %(default)s)")
    parser.add_argument(
        "--cross-fusion",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="A-QCF blocks between the streams (default: on)",
    )
    parser.add_argument("--algebra", choices=ALGEBRAS, default=QUATERNION, help="(default: %(default)s)")
    parser.add_argument("--bottleneck", choices=BOTTLENECKS, default=SHARED, help="(default: %(default)s)")
    parser.add_argument(
        "--attention-gates",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="attention-gated decoder skips (default: on)",
    )
    args = parser.parse_args(argv)
    kwargs = {
        "in_channels": args.in_channels,
        "num_classes": args.num_classes,
        "widths": tuple(args.widths),
        "gate": args.gate,
        "cross_fusion": args.cross_fusion,
        "algebra": args.algebra,
        "bottleneck": args.bottleneck,
        "attention_gates": args.attention_gates,
    }
    settings = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    print(format_table(parameter_table(**kwargs), f"A-QCF-Net ({settings})"))
    return 0
