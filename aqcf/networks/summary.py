"""``aqcf summary``: parameter counts of A-QCF-Net per part, beside the paper's 31.5 M.

The networks are built on PyTorch's ``meta`` device (shapes only, no memory, no initialisation cost),
so the paper-sized network and its real-valued twin are counted in about a second.

``--reading NAME`` counts one of the named readings of section 3.2.3 (:data:`READINGS`) on top of the
other options; ``--reading all`` prints one line per reading with its growth relative to 31.5 M.

Above the table of parts, the configured network is counted again with 1 to 4 streams
(``modalities``): stems, encoders, decoders and heads grow with M; with separate A-QCF weights the
directions' projections and gate MLPs grow with M(M-1) and the ``QConv_out`` with M.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Sequence

import torch
from torch import nn

from aqcf.constants import MODALITIES
from aqcf.errors import ArgumentParser
from aqcf.networks.aqcfnet import (
    BOTTLENECKS,
    DEFAULT_READING,
    PAPER_PARAMETERS,
    PAPER_WIDTHS,
    READINGS,
    SHARED,
    AQCFNet,
    count_parameters,
)
from aqcf.nn.blocks import ALGEBRAS, QUATERNION, REAL
from aqcf.nn.fusion import ADAPTIVE, FUSION_WEIGHTS, GATES, OUT_KERNELS

__all__ = [
    "parameter_table",
    "format_table",
    "reading_rows",
    "format_readings",
    "stream_names",
    "stream_rows",
    "format_streams",
    "growth",
    "main",
]
ALL_READINGS = "all"
STREAM_COUNTS = (1, 2, 3, 4)
# the options' defaults are the network's, so a change of AQCFNet's defaults reaches the summary
_DEFAULTS = {name: p.default for name, p in inspect.signature(AQCFNet).parameters.items()}


def growth(total: int) -> str:
    """``total`` relative to the paper's 31.5 M, e.g. ``"1.94x, +93.7%"``."""
    ratio = total / PAPER_PARAMETERS
    return f"{ratio:.2f}x, {100 * (ratio - 1):+.1f}%"


def _build(**kwargs) -> AQCFNet:
    with torch.device("meta"):
        return AQCFNet(**kwargs)


def _attention_gates(net: AQCFNet) -> list[nn.Module]:
    return [stage.attention_gate for d in net.decoders.values() for stage in d.stages if stage.attention_gate]


def _parts(net: AQCFNet) -> list[tuple[str, int]]:
    streams = " + ".join(m.upper() for m in net.modalities)
    rows = [
        (f"stems ({streams})", count_parameters(net.stems)),
        (f"encoders ({streams})", count_parameters(net.encoders)),
    ]
    fusion = net.fusion if net.fusion is not None else []
    rows.append(("A-QCF fusion blocks", sum(count_parameters(b) for b in fusion)))
    rows += [(f"  stage {s + 1}", count_parameters(b)) for s, b in enumerate(fusion)]
    shared = "shared" if net.bottleneck_mode == SHARED else "separate"
    rows.append((f"bottleneck ({shared})", count_parameters(net.bottleneck)))
    rows.append((f"decoders ({streams})", count_parameters(net.decoders)))
    rows.append(("  of which attention gates", sum(count_parameters(g) for g in _attention_gates(net))))
    rows.append((f"heads ({streams})", count_parameters(net.heads)))
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
    lines.append(f"{'paper (section 4.1.4)':<28}{int(PAPER_PARAMETERS):>15,}   (this network: {growth(rows[-1][1])})")
    return "\n".join(lines)


def reading_rows(**kwargs) -> list[tuple[str, int]]:
    """``(reading, total parameters)`` for every reading of :data:`READINGS` on top of ``kwargs``."""
    return [(name, count_parameters(_build(**{**kwargs, **reading}))) for name, reading in READINGS.items()]


def format_readings(rows: Sequence[tuple[str, int]]) -> str:
    """A plain-text table of :func:`reading_rows`: settings, total and growth relative to 31.5 M."""
    lines = [
        "Readings of section 3.2.3 (AQCFNet arguments that differ from the default)",
        f"{'reading':<16}{'parameters':>15}  {'vs 31.5 M':<16}settings",
    ]
    for name, total in rows:
        settings = ", ".join(f"{k}={v}" for k, v in READINGS[name].items()) or "(the default)"
        lines.append(f"{name:<16}{total:>15,}  {growth(total):<16}{settings}")
    lines.append(f"{'paper':<16}{int(PAPER_PARAMETERS):>15,}")
    return "\n".join(lines)


def stream_names(count: int, modalities: Sequence[str] = MODALITIES) -> tuple[str, ...]:
    """``count`` stream names: ``modalities`` cut or extended by ``stream3``, ``stream4``, ..."""
    names = list(modalities[:count])
    i = len(names)
    while len(names) < count:
        i += 1
        if f"stream{i}" not in names:
            names.append(f"stream{i}")
    return tuple(names)


def stream_rows(counts: Sequence[int] = STREAM_COUNTS, **kwargs) -> list[tuple[int, int]]:
    """``(M, total parameters)`` of the network of ``kwargs`` built with M streams, for each M."""
    modalities = tuple(kwargs.pop("modalities", MODALITIES))
    return [(m, count_parameters(_build(**kwargs, modalities=stream_names(m, modalities)))) for m in counts]


def format_streams(rows: Sequence[tuple[int, int]]) -> str:
    """A plain-text table of :func:`stream_rows`: total, growth over one stream fewer, and vs 31.5 M."""
    lines = [
        "Parameters of this network with M streams: stems, encoders, decoders and heads x M; separate A-QCF",
        "weights: QConv_q/k/v and gate MLP x M(M-1) directions, QConv_out x M; shared A-QCF weights: one set",
        f"{'streams':<10}{'parameters':>15}{'added stream':>15}  vs 31.5 M",
    ]
    previous = None
    for m, total in rows:
        added = "" if previous is None else f"{total - previous:+,}"
        lines.append(f"{'M = ' + str(m):<10}{total:>15,}{added:>15}  {growth(total)}")
        previous = total
    return "\n".join(lines)


def _on_off(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A ``--flag`` / ``--no-flag`` pair, on by default."""
    parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=True, help=f"{help} (default: on)")


def _parser() -> argparse.ArgumentParser:  # long: the flat list of the verb's flags, one per AQCFNet option
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
    _on_off(parser, "--cross-fusion", "A-QCF blocks between the streams")
    parser.add_argument("--algebra", choices=ALGEBRAS, default=QUATERNION, help="(default: %(default)s)")
    parser.add_argument("--bottleneck", choices=BOTTLENECKS, default=SHARED, help="(default: %(default)s)")
    _on_off(parser, "--attention-gates", "attention-gated decoder skips")
    parser.add_argument("--fusion-out-kernel", type=int, choices=OUT_KERNELS, default=_DEFAULTS["fusion_out_kernel"],
                        help="kernel of the A-QCF blocks' QConv_out (default: %(default)s)")
    parser.add_argument("--fusion-weights", choices=FUSION_WEIGHTS, default=_DEFAULTS["fusion_weights"],
                        help="A-QCF weights per direction or shared by all (default: %(default)s)")
    for part in ("encoder", "decoder", "bottleneck"):
        parser.add_argument(f"--{part}-convs", type=int, default=_DEFAULTS[f"{part}_convs"],
                            help=f"conv blocks per {part} stage (default: %(default)s)")
    parser.add_argument("--modalities", nargs="+", default=list(MODALITIES),
                        help="stream names (default: %(default)s); the M-streams table extends or cuts them")
    parser.add_argument(
        "--reading",
        choices=[*READINGS, ALL_READINGS],
        default=None,
        help=f"a named reading of section 3.2.3 on top of the other options ({DEFAULT_READING}: the default "
        f"network), or '{ALL_READINGS}' for one line per reading",
    )
    return parser


def _network_kwargs(args: argparse.Namespace) -> dict:
    """The :class:`AQCFNet` arguments the parsed flags give (``--reading`` not applied)."""
    return {
        "in_channels": args.in_channels,
        "num_classes": args.num_classes,
        "widths": tuple(args.widths),
        "gate": args.gate,
        "cross_fusion": args.cross_fusion,
        "algebra": args.algebra,
        "bottleneck": args.bottleneck,
        "attention_gates": args.attention_gates,
        "fusion_out_kernel": args.fusion_out_kernel,
        "fusion_weights": args.fusion_weights,
        "encoder_convs": args.encoder_convs,
        "decoder_convs": args.decoder_convs,
        "bottleneck_convs": args.bottleneck_convs,
        "modalities": tuple(args.modalities),
    }


def main(argv: list[str] | None = None) -> int:
    """``aqcf summary``: prints the parameter tables; returns the exit code."""
    args = _parser().parse_args(argv)
    kwargs = _network_kwargs(args)
    if args.reading == ALL_READINGS:
        print(format_readings(reading_rows(**kwargs)))
        return 0
    if args.reading is not None:
        kwargs.update(READINGS[args.reading])
    settings = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    # the table of parts last: its final line compares the total with the paper's
    print(format_streams(stream_rows(**kwargs)))
    print()
    print(format_table(parameter_table(**kwargs), f"A-QCF-Net ({settings})"))
    return 0
