"""``aqcf demo``: phantom cohorts -> joint training -> held-out test -> a short report with pictures.

The whole pipeline a user runs on real data, on phantoms written by ``aqcf synth`` so that it runs
anywhere: the CT cohort in the LiTS layout, the MRI cohort in the ATLAS layout, trained jointly with
``configs/demo.yaml`` and tested on fold 0's held-out cases of each modality. Rerunning resumes: the
phantoms are kept, an interrupted training resumes from ``last.ckpt``, and a finished one is reused (the
report is written again). A non-empty ``--out`` that holds no demo is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from aqcf.errors import AqcfError
from aqcf.io import check_output

__all__ = ["main", "demo_report"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
# Easier than the realistic calibration (tumor radius 3-15 mm, contrast 1, MRI bias field 0.2): a CPU demo
# trains for minutes, not hours. `aqcf synth --help` lists every knob; --synth-args "" gives the realistic
# phantoms.
DEMO_PHANTOMS = (
    "--ct-tumor-radius 8 20 --ct-contrast 2.5 --mri-tumor-radius 8 20 --mri-contrast 2.5 --mri-bias 0.05"
)

#: what the demo writes into --out; a folder holding one of them is a demo to resume
DEMO_OUTPUTS = ("phantoms", "cache", "run", "report.md", "curves.png")


def _parser() -> argparse.ArgumentParser:
    from aqcf.errors import ArgumentParser

    parser = ArgumentParser(prog="aqcf demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default configs/demo.yaml)")
    parser.add_argument("--n-ct", type=int, default=20, help="CT phantoms (default 20)")
    parser.add_argument("--n-mri", type=int, default=20, help="MRI phantoms (default 20)")
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 48), metavar=("X", "Y", "Z"),
                        help="phantom size in voxels (default 128 128 48)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--synth-args", default=DEMO_PHANTOMS,
                        help=f"`aqcf synth` difficulty flags (default \"{DEMO_PHANTOMS}\")")
    parser.add_argument("--fit-args", default="", help="extra `aqcf fit` arguments, e.g. \"--trainer.max_epochs 2\"")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out that holds no demo (a demo folder is resumed anyway)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from aqcf.cli import main as aqcf

    args = _parser().parse_args(argv)
    out = Path(args.out)
    data = out / "phantoms"
    run = out / "run"
    config = Path(args.config)
    if not config.is_file():
        raise AqcfError(f"{config}: config not found")
    resuming = out.is_dir() and any((out / name).exists() for name in DEMO_OUTPUTS)
    check_output(out, inputs=[config], overwrite=True, kind="folder", names=DEMO_OUTPUTS)
    if not resuming:  # someone else's folder
        check_output(out, overwrite=args.overwrite, kind="folder")
    start = time.perf_counter()
    timings: dict[str, float] = {}

    if not (data / "LiTS").is_dir():
        print(f"[demo] 1/4 writing {args.n_ct} CT + {args.n_mri} MRI phantoms to {data}", flush=True)
        synth = ["synth", "--out", str(data), "--n-ct", str(args.n_ct), "--n-mri", str(args.n_mri),
                 "--shape", *map(str, args.shape), "--seed", str(args.seed), *args.synth_args.split(),
                 "--overwrite"]  # phantoms/ without LiTS/ is what an interrupted synth left
        _check(aqcf(synth), "synth")
    else:
        print(f"[demo] 1/4 reusing the phantoms in {data}", flush=True)
    timings["synth"] = time.perf_counter() - start

    common = ["--config", str(config), "--data.ct_root", str(data / "LiTS"), "--data.mri_root", str(data / "ATLAS"),
              "--data.cache_dir", str(out / "cache"), "--trainer.default_root_dir", str(run), "--run_name", "demo"]
    checkpoints = run / "checkpoints"
    t = time.perf_counter()
    if (run / "test" / "summary.json").is_file():
        print(f"[demo] 2/4 training done before: reusing {checkpoints}", flush=True)
    else:
        resume = ["--ckpt_path", "last"] if (checkpoints / "last.ckpt").is_file() else []
        print(f"[demo] 2/4 training configs/{config.name} (preprocessing first){' - resuming' if resume else ''}",
              flush=True)
        _check(aqcf(["fit", *common, *args.fit_args.split(), *resume]), "fit")
    timings["fit"] = time.perf_counter() - t

    t = time.perf_counter()
    best = checkpoints / "best.ckpt"
    if not best.is_file():
        best = checkpoints / "last.ckpt"
    if not (run / "test" / "summary.json").is_file():
        print(f"[demo] 3/4 testing {best.name} on the held-out phantoms of each modality", flush=True)
        # no summary.json: results of an interrupted test, if any, are replaced
        test = ["test", *common, *args.fit_args.split(), "--ckpt_path", str(best), "--overwrite", "true"]
        _check(aqcf(test), "test")
    timings["test"] = time.perf_counter() - t

    print("[demo] 4/4 writing the report", flush=True)
    timings["total"] = time.perf_counter() - start
    report = demo_report(run, out, timings)
    print(report)
    return 0


def _check(code: int, step: str) -> None:
    if code:
        raise AqcfError(f"demo: `aqcf {step}` failed (exit code {code})")


def demo_report(run: Path, out: Path, timings: dict[str, float] | None = None) -> str:
    """Write ``OUT/report.md`` (Dice table, training curves, overlays) and return the table as text.

    Dice is reported pooled over the held-out cases of a modality (2·Σ|P∩R| / (Σ|P|+Σ|R|)) next to the
    per-case mean: tumor-free cases make a per-case mean jump between 0 and 1 on a few voxels.
    """
    from aqcf.io import write_text_atomic
    from aqcf.visualize.curves import plot_curves

    summary = json.loads((run / "test" / "summary.json").read_text())
    lines = ["| modality | class | pooled Dice | mean Dice (per case) | HD95 mm | cases |", "|---|---|---|---|---|---|"]
    for modality, classes in summary["per_modality"].items():
        for name, entry in classes.items():
            lines.append(
                f"| {modality.upper()} | {name} | {entry['pooled_dice']:.3f} | {_fmt(entry['dice'])} | "
                f"{_fmt(entry['hd95'], 1)} | {entry['n_cases']} |"
            )
    table = "\n".join(lines)
    figures = []
    try:
        plot_curves([run / "csv"], out / "curves.png", title="demo training")  # the CSV logger's folder
        figures.append("![training curves](curves.png)")
    except AqcfError as err:  # no logged epochs yet
        figures.append(f"(no training curves: {err})")
    overlays = sorted((run / "test" / "overlays").glob("*.png"))
    figures += [f"![{p.stem}]({p.relative_to(out)})" for p in overlays]
    timing = ""
    if timings:
        timing = "Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + "\n\n"
    text = (
        "# aqcf demo: A-QCF-Net on phantom LiTS (CT) + ATLAS (MRI) cohorts\n\n"
        f"Checkpoint: `{summary.get('source', {}).get('checkpoint', '')}`\n\n{timing}"
        "Held-out cases of fold 0. Pooled Dice sums intersections and sizes over the cases of a modality; "
        "the per-case mean is fragile where a case has no tumor.\n\n"
        f"{table}\n\n" + "\n\n".join(figures) + "\n"
    )
    write_text_atomic(out / "report.md", text)
    return table


def _fmt(stats: dict, digits: int = 3) -> str:
    if stats.get("mean") is None:
        return "n/a"
    sd = stats.get("std")
    return f"{stats['mean']:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")
