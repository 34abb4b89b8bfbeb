"""Run every ``benchmarks/bench_*.py`` and write one JSON and one Markdown table.

Each benchmark module exposes ``run(quick: bool = False) -> list[dict]``; a row has the keys
``benchmark``, ``case``, ``metric``, ``value``, ``unit`` and optionally ``note``.

Usage: ``python benchmarks/run.py --out benchmarks/results [--quick] [--only model,data]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from aqcf.io import write_text_atomic

HERE = Path(__file__).resolve().parent


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _markdown(rows: list[dict], machine: str) -> str:
    header = "| benchmark | case | metric | value | unit | note |"
    lines = [f"Machine: {machine}", "", header, "|---|---|---|---|---|---|"]
    for r in rows:
        value = r["value"]
        value = f"{value:.4g}" if isinstance(value, float) else str(value)
        cells = [r["benchmark"], r["case"], r["metric"], value, r["unit"], r.get("note", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results"), help="output stem: writes STEM.json and STEM.md")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (bench_NAME.py)")
    args = parser.parse_args(argv)

    names = [n for n in args.only.split(",") if n]
    paths = sorted(HERE.glob("bench_*.py"))
    if names:
        paths = [p for p in paths if p.stem.removeprefix("bench_") in names]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name(0)}"
    rows: list[dict] = []
    for path in paths:
        start = time.perf_counter()
        print(f"[bench] {path.stem} ...", flush=True)
        rows += _load(path).run(quick=args.quick)
        print(f"[bench] {path.stem} done in {time.perf_counter() - start:.1f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps({"machine": machine, "rows": rows}, indent=2))
    table = _markdown(rows, machine)
    write_text_atomic(out.with_suffix(".md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
