"""``aqcf report``: cross-validation tables, Wilcoxon tests and the ablation view from ``summary.json`` files.

Input contract: each run folder is one experiment; below it, at any depth, one ``summary.json`` (as
written by :mod:`aqcf.evaluation.evaluate`) per fold, e.g. ``runs/full/fold0/test/summary.json``. A
fold's score for a modality, class and metric is that fold's per-case mean. The fold a summary belongs
to is the first folder on its path named ``foldN`` (``fold3``, ``fold_3``, ``fold-3``), else its folder
relative to the run; summaries of one fold that hold different modalities (``fold0/ct/summary.json``,
``fold0/mri/summary.json``) are merged. Runs are paired fold by fold for the tests.

Output (``--out``): ``report.md`` (the paper's Table 2/3 layout per modality, the significance table,
the Table 7-like ablation view), ``table_ct.csv``, ``table_mri.csv``, ``significance.csv``,
``ablation.csv``, ``folds.csv`` (every fold-wise score) and ``dice.png`` (bar chart of the Dice table).
The statistics (SD, undefined distances, Wilcoxon, Bonferroni, the ablation score): docs/evaluation.md,
*`aqcf report`*.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import wilcoxon

from aqcf.constants import MODALITIES, REGIONS
from aqcf.errors import AqcfError
from aqcf.evaluation.metrics import METRICS
from aqcf.io import check_output, write_text_atomic
from aqcf.visualize.canvas import save_figure
from aqcf.visualize.charts import bar_chart

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Run",
    "load_run",
    "parse_run_spec",
    "fold_scores",
    "mean_sd",
    "results_table",
    "significance_table",
    "ablation_table",
    "min_exact_p",
    "write_report",
    "main",
]

SUMMARY_NAME = "summary.json"
FOLD_PATTERN = re.compile(r"^fold[_-]?(\d+)$", re.IGNORECASE)
SEED_PATTERN = re.compile(r"^seed[_-]?(\d+)$", re.IGNORECASE)
CLASSES = tuple(REGIONS)
ALPHA = 0.05
DEFAULT_FOLDS = 5  # the paper's five-fold cross-validation
# how the Markdown shows each metric: (column title, scale, decimals); Dice in % as in the paper
DISPLAY = {"dice": ("Dice (%)", 100.0, 1), "hd95": ("HD95 (mm)", 1.0, 2), "msd": ("MSD (mm)", 1.0, 2)}
MODALITY_TITLES = {"ct": "CT", "mri": "MRI"}
DICE_DPI = 120


@dataclass
class Run:
    """One experiment: its row name, folder, and per fold the merged ``per_modality`` summaries."""

    name: str
    path: Path
    folds: dict[str, dict] = field(default_factory=dict)  # fold key -> {modality: {class: {...}}}
    sources: dict[str, list[Path]] = field(default_factory=dict)  # fold key -> summary files
    protocols: set[str] = field(default_factory=set)  # validation protocols named by the summaries


def parse_run_spec(spec: str) -> tuple[str, Path]:
    """``"NAME=PATH"`` -> (NAME, PATH); a bare ``"PATH"`` is named after its folder."""
    if "=" in spec:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise AqcfError(f"run {spec!r}: expected NAME=PATH or PATH")
        return name, Path(path)
    path = Path(spec)
    return path.resolve().name, path


def _fold_key(relative_dir: Path) -> str:
    """The unit a summary belongs to: ``fold3``, or ``fold3/seed1`` below a ``seed1`` folder (seed 0 and
    runs without seeds: the fold alone), so runs pair on matched (fold, seed) units."""
    fold = seed = None
    for part in relative_dir.parts:
        if fold is None and (match := FOLD_PATTERN.match(part)):
            fold = f"fold{int(match.group(1))}"
        if seed is None and (match := SEED_PATTERN.match(part)):
            seed = int(match.group(1))
    if fold is None:
        return relative_dir.as_posix()
    return fold if not seed else f"{fold}/seed{seed}"


def load_run(name: str, path: str | Path, pattern: str | Sequence[str] = f"**/{SUMMARY_NAME}") -> Run:
    """Collect the fold summaries below ``path``.

    Args:
        name: the run's row name.
        path: the run folder.
        pattern: glob (relative to ``path``) selecting the summaries, e.g. ``"*/test/summary.json"``.

    Returns:
        The :class:`Run` with one entry per fold.
    """
    path = Path(path)
    if not path.is_dir():
        raise AqcfError(f"{path}: run folder not found")
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    files = sorted({p for pat in patterns for p in path.glob(pat) if p.is_file()})
    if not files:
        raise AqcfError(f"{path}: no {' or '.join(patterns)} below this run folder")
    run = Run(name=name, path=path)
    for file in files:
        try:
            summary = json.loads(file.read_text())
            per_modality = summary["per_modality"]
            protocol = (summary.get("source") or {}).get("protocol")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise AqcfError(f"{file}: not a summary written by `aqcf evaluate` ({err})") from err
        key = _fold_key(file.parent.relative_to(path))
        merged = run.folds.setdefault(key, {})
        for modality, classes in per_modality.items():
            if modality in merged:
                others = ", ".join(str(p) for p in run.sources[key])
                raise AqcfError(f"{file}: fold {key} already has {modality} results (from {others})")
            merged[modality] = classes
        run.sources.setdefault(key, []).append(file)
        run.protocols.add(protocol or "unknown")
    return run


def _stats(per_modality: Mapping, modality: str, cls: str, metric: str) -> Mapping:
    """One fold's ``{"mean", "std", "n", "n_undefined", ...}`` for a modality, class and metric; ``{}`` if absent."""
    try:
        stats = per_modality[modality][cls][metric]
    except (KeyError, TypeError):
        return {}
    return stats if isinstance(stats, Mapping) else {}


def fold_scores(run: Run, modality: str, cls: str, metric: str) -> dict[str, float]:
    """Fold key -> the fold's per-case mean of ``metric`` for ``cls`` on ``modality`` (defined folds only)."""
    scores = {}
    for key, per_modality in run.folds.items():
        value = _stats(per_modality, modality, cls, metric).get("mean")
        if value is not None and math.isfinite(float(value)):
            scores[key] = float(value)
    return scores


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample SD (ddof 1; NaN for fewer than two values) and count."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan, int(arr.size)


def min_exact_p(n: int) -> float:
    """Smallest two-sided p-value the exact Wilcoxon signed-rank test can give on ``n`` pairs: 2 / 2^n."""
    return min(1.0, 2.0 / 2.0**n)


def results_table(runs: Sequence[Run], modality: str) -> list[dict]:
    """Table 2/3 rows for one modality: per run, mean and SD across folds of each metric and class.

    Returns:
        One dict per run that has results for ``modality``: ``run``, ``n_folds`` and
        ``{metric}_{class}_mean`` / ``_sd`` / ``_n`` (Dice as a fraction, distances in mm) /
        ``_undefined`` (cases, summed over folds, left out of the per-case means as undefined: a distance
        where exactly one of prediction and reference is empty).
    """
    rows = []
    for run in runs:
        row: dict = {"run": run.name}
        n_folds = 0
        for metric in METRICS:
            for cls in CLASSES:
                mean, sd, n = mean_sd(fold_scores(run, modality, cls, metric).values())
                undefined = sum(int(_stats(fold, modality, cls, metric).get("n_undefined") or 0)
                                for fold in run.folds.values())
                row.update({f"{metric}_{cls}_mean": mean, f"{metric}_{cls}_sd": sd, f"{metric}_{cls}_n": n,
                            f"{metric}_{cls}_undefined": undefined})
                n_folds = max(n_folds, n)
        if n_folds:
            rows.append({"run": run.name, "n_folds": n_folds, **{k: v for k, v in row.items() if k != "run"}})
    return rows


def significance_table(
    runs: Sequence[Run], baseline: str, metrics: Sequence[str] = ("dice",), alpha: float = ALPHA
) -> list[dict]:
    """Two-sided Wilcoxon signed-rank tests of every run against ``baseline`` on paired fold-wise scores.

    For each modality, class and metric, the family is the comparisons of the baseline with each other
    run that has paired folds; Bonferroni multiplies each p-value by the family size and caps it at 1.
    ``scipy.stats.wilcoxon`` with its defaults (exact null distribution for up to 50 pairs without
    ties or zero differences, exhaustive permutations with them). All differences zero: p = 1.

    Returns:
        Rows with ``modality``, ``class``, ``metric``, ``run``, ``baseline``, ``n_folds``,
        ``mean_difference`` (run − baseline), ``statistic``, ``p``, ``p_bonferroni``, ``comparisons``,
        ``significant`` (``p_bonferroni < alpha``).
    """
    by_name = {run.name: run for run in runs}
    if baseline not in by_name:
        raise AqcfError(f"baseline {baseline!r} is not one of the runs {sorted(by_name)}")
    base = by_name[baseline]
    rows = []
    for modality in MODALITIES:
        for cls in CLASSES:
            for metric in metrics:
                base_scores = fold_scores(base, modality, cls, metric)
                family = []
                for run in runs:
                    if run.name == baseline:
                        continue
                    scores = fold_scores(run, modality, cls, metric)
                    common = sorted(set(scores) & set(base_scores))
                    if not common:
                        continue
                    x = np.array([scores[k] for k in common])
                    y = np.array([base_scores[k] for k in common])
                    if np.all(x == y):
                        statistic, p = 0.0, 1.0
                    else:
                        # explicit: scipy's defaults for these changed across releases
                        result = wilcoxon(x, y, zero_method="wilcox", alternative="two-sided", method="auto")
                        statistic, p = float(result.statistic), float(result.pvalue)
                    family.append({
                        "modality": modality, "class": cls, "metric": metric, "run": run.name,
                        "baseline": baseline, "n_folds": len(common),
                        "mean_difference": float(np.mean(x - y)), "statistic": statistic, "p": p,
                    })
                for row in family:
                    row["comparisons"] = len(family)
                    row["p_bonferroni"] = min(1.0, row["p"] * len(family))
                    row["significant"] = bool(row["p_bonferroni"] < alpha)
                rows.extend(family)
    return rows


def ablation_table(runs: Sequence[Run], baseline: str) -> list[dict]:
    """Table 7-like view: per run, the mean Dice over liver and tumor and over CT and MRI.

    Each fold's score is the mean of its per-case Dice means over every class and modality present in
    that fold; the table gives their mean and SD across folds and the % change of the mean against
    ``baseline``: ``100 · (mean − mean_baseline) / mean_baseline``.
    """
    rows = []
    for run in runs:
        per_fold = []
        seen: set[str] = set()
        for key in run.folds:
            values = []
            for modality in MODALITIES:
                for cls in CLASSES:
                    score = fold_scores(run, modality, cls, "dice").get(key)
                    if score is not None:
                        values.append(score)
                        seen.add(modality)
            if values:
                per_fold.append(float(np.mean(values)))
        mean, sd, n = mean_sd(per_fold)
        rows.append({"run": run.name, "mean_dice": mean, "sd": sd, "n_folds": n,
                     "modalities": "+".join(m for m in MODALITIES if m in seen)})
    base = next(r for r in rows if r["run"] == baseline)
    for row in rows:
        change = 100.0 * (row["mean_dice"] - base["mean_dice"]) / base["mean_dice"]
        row["change_percent"] = math.nan if row["run"] == baseline else change
    return rows


# ---------------------------------------------------------------------------------------------- output


def _fmt(value: float, decimals: int, scale: float = 1.0) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value * scale:.{decimals}f}"


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _csv(rows: Sequence[Mapping]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
    return buffer.getvalue()


def _results_markdown(rows: Sequence[Mapping]) -> str:
    header = ["Run", "Folds"] + [f"{DISPLAY[m][0]} {c.capitalize()}" for m in METRICS for c in CLASSES]
    body = []
    any_undefined = False
    for row in rows:
        cells = [row["run"], str(row["n_folds"])]
        for metric in METRICS:
            _, scale, decimals = DISPLAY[metric]
            for cls in CLASSES:
                mean, sd = row[f"{metric}_{cls}_mean"], row[f"{metric}_{cls}_sd"]
                cell = f"{_fmt(mean, decimals, scale)} ± {_fmt(sd, decimals, scale)}"
                undefined = row.get(f"{metric}_{cls}_undefined", 0)
                if undefined:
                    cell += f" [{undefined} undef.]"
                    any_undefined = True
                cells.append(cell)
        body.append(cells)
    table = _markdown(header, body)
    if any_undefined:
        table += ("\n\n[k undef.]: k cases (over all folds) where exactly one of prediction and reference is "
                  "empty, so the distance is undefined; the mean covers the other cases only "
                  "(`aqcf evaluate --empty-distance diagonal` scores them instead).")
    return table


def _significance_markdown(rows: Sequence[Mapping], alpha: float) -> str:
    header = ["Modality", "Class", "Metric", "Run", "vs", "Folds", "Mean diff.", "W", "p", "p (Bonferroni)",
              f"p < {alpha:g}"]
    body = []
    for row in rows:
        _, scale, decimals = DISPLAY[row["metric"]]
        body.append([MODALITY_TITLES[row["modality"]], row["class"], DISPLAY[row["metric"]][0], row["run"],
                     row["baseline"], str(row["n_folds"]), _fmt(row["mean_difference"], decimals + 1, scale),
                     f"{row['statistic']:g}", _fmt_p(row["p"]), _fmt_p(row["p_bonferroni"]),
                     "yes" if row["significant"] else "no"])
    return _markdown(header, body)


def _ablation_markdown(rows: Sequence[Mapping]) -> str:
    header = ["Run", "Modalities", "Folds", "Mean Dice (± SD)", "% Change"]
    body = [[r["run"], r["modalities"].replace("+", " + ").upper(), str(r["n_folds"]),
             f"{_fmt(r['mean_dice'], 3)} ± {_fmt(r['sd'], 3)}",
             "—" if not math.isfinite(r["change_percent"]) else f"{r['change_percent']:+.1f}%"] for r in rows]
    return _markdown(header, body)


def _folds_rows(runs: Sequence[Run]) -> list[dict]:
    rows = []
    for run in runs:
        for modality in MODALITIES:
            for cls in CLASSES:
                for metric in METRICS:
                    for key, value in sorted(fold_scores(run, modality, cls, metric).items()):
                        rows.append({"run": run.name, "fold": key, "modality": modality, "class": cls,
                                     "metric": metric, "value": value})
    return rows


def _dice_chart(tables: Mapping[str, Sequence[Mapping]], order: Sequence[str]) -> Figure:
    """The Dice table as bars: per modality and class a group, per run a bar of its mean (%) ± SD."""
    groups = [(m, c) for m in MODALITIES if tables.get(m) for c in CLASSES]
    present = {r["run"] for m in MODALITIES for r in tables.get(m, [])}
    bars = {}
    for name in (name for name in order if name in present):
        means, sds = [], []
        for modality, cls in groups:
            row = next((r for r in tables[modality] if r["run"] == name), None)
            means.append(100 * row[f"dice_{cls}_mean"] if row else math.nan)
            sds.append(100 * row[f"dice_{cls}_sd"] if row and math.isfinite(row[f"dice_{cls}_sd"]) else 0.0)
        bars[name] = (means, sds)
    return bar_chart([f"{MODALITY_TITLES[m]} {c}" for m, c in groups], bars,
                     ylabel="Dice (%), mean ± SD across folds", ylim=(0, 100))


def write_report(
    runs: Sequence[Run],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    metrics: Sequence[str] = ("dice",),
    alpha: float = ALPHA,
) -> dict:
    """Build every table and write them (atomically) to ``out_dir``.

    Args:
        runs: the runs, in row order.
        out_dir: output folder (created; existing report files are replaced).
        baseline: run the others are tested and compared against; default the first.
        metrics: metrics given a significance test (``dice``, ``hd95``, ``msd``).
        alpha: family-wise significance level.

    Returns:
        ``{"tables": {modality: rows}, "significance": rows, "ablation": rows}``.
    """
    names = [run.name for run in runs]  # the first line lists them as given
    runs, baseline = _checked_runs(runs, baseline, metrics)
    tables = {m: results_table(runs, m) for m in MODALITIES}
    significance = significance_table(runs, baseline, metrics, alpha)
    ablation = ablation_table(runs, baseline)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unit = "(fold, seed) unit" if _seeded(runs) else "fold"
    sections = _preamble(names, runs, baseline, unit)
    for modality in MODALITIES:
        if tables[modality]:
            sections += ["", f"## {MODALITY_TITLES[modality]}: Dice, HD95, MSD (mean ± SD across folds)", "",
                         _results_markdown(tables[modality])]
            write_text_atomic(out / f"table_{modality}.csv", _csv(tables[modality]))
    sections += _significance_section(runs, baseline, significance, alpha, unit)
    sections += ["", "## Ablation view: mean Dice over liver and tumor and over CT and MRI", "",
                 _ablation_markdown(ablation), "",
                 f"% change of the mean against {baseline}."]
    write_text_atomic(out / "report.md", "\n".join(sections) + "\n")
    write_text_atomic(out / "significance.csv", _csv(significance))
    write_text_atomic(out / "ablation.csv", _csv(ablation))
    write_text_atomic(out / "folds.csv", _csv(_folds_rows(runs)))
    save_figure(_dice_chart(tables, [run.name for run in runs]), out / "dice.png", dpi=DICE_DPI)
    return {"tables": tables, "significance": significance, "ablation": ablation}


def _checked_runs(runs: Sequence[Run], baseline: str | None, metrics: Sequence[str]) -> tuple[list[Run], str]:
    """The runs with the baseline (default: the first run) moved to the front, and the baseline's name.

    Raises:
        AqcfError: no runs, two runs of one name, or an unknown metric.
    """
    if not runs:
        raise AqcfError("no runs given")
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise AqcfError(f"run names {names} are not unique: name them with NAME=PATH")
    baseline = baseline or runs[0].name
    for metric in metrics:
        if metric not in METRICS:
            raise AqcfError(f"metric {metric!r} is not one of {METRICS}")
    # the baseline first: its row is the reference of the ablation view and the tests
    return sorted(runs, key=lambda run: run.name != baseline), baseline


def _seeded(runs: Sequence[Run]) -> bool:
    """Whether the runs' units are (fold, seed) pairs rather than folds."""
    return any("/seed" in key for run in runs for key in run.folds)


def _preamble(names: Sequence[str], runs: Sequence[Run], baseline: str, unit: str) -> list[str]:
    """The report's title, what its scores are, and the validation protocols the runs were selected by."""
    protocols = sorted(set().union(*(run.protocols for run in runs)))
    described = {"inner": "inner validation set from the training folds (the test fold untouched)",
                 "heldout": "the held-out test fold (the paper's reading: it also selected the checkpoint)",
                 "unknown": "not recorded (summaries written before the protocol was recorded)"}
    return ["# Cross-validation report", "",
            f"Runs: {', '.join(names)}. Baseline: {baseline}. Scores per {unit} are its per-case "
            f"means; tables show mean ± SD (sample SD, ddof 1) across {unit}s"
            + (" (folds × seeds; n counts them)." if _seeded(runs) else "."),
            "",
            "Model selection (validation protocol): "
            + "; ".join(f"{p}: {described.get(p, p)}" for p in protocols)
            + (". **The runs were selected under different protocols.**" if len(protocols) > 1 else ".")]


def _significance_section(
    runs: Sequence[Run], baseline: str, significance: Sequence[Mapping], alpha: float, unit: str
) -> list[str]:
    """The Wilcoxon table against ``baseline`` and its footnote (the smallest p the folds allow)."""
    sections = ["", f"## Wilcoxon signed-rank tests against {baseline}", ""]
    if significance:
        sections += [_significance_markdown(significance, alpha), ""]
    else:
        sections += ["No run shares folds with the baseline.", ""]
    footnote = (
        f"Two-sided Wilcoxon signed-rank test on paired {unit}-wise scores (n = matched {unit}s); mean diff. = "
        "run − baseline (Dice "
        "in percentage points, distances in mm); Bonferroni: p × number of comparisons per modality, class "
        f"and metric, capped at 1; significant if the corrected p < {alpha:g}. With n paired folds the "
        "exact two-sided p-value cannot go below 2/2^n, i.e. 0.0625 for 5 folds: with 5 folds no "
        "comparison can reach p < 0.05, before or after correction."
    )
    max_folds = max((len(run.folds) for run in runs), default=0)
    if max_folds != DEFAULT_FOLDS:
        footnote += f" These runs have up to {max_folds} folds: p ≥ {_fmt_p(min_exact_p(max_folds))}."
    return sections + [footnote]


#: what :func:`write_report` writes into its folder (``--overwrite`` replaces them)
REPORT_FILES = ("report.md", "table_*.csv", "significance.csv", "ablation.csv", "folds.csv", "dice.png")


def main(argv: list[str] | None = None) -> int:
    """``aqcf report RUN_DIR... --out DIR [--baseline NAME] [--metric dice ...]``."""
    from aqcf.errors import ArgumentParser

    parser = ArgumentParser(
        prog="aqcf report",
        description="Cross-validation tables (mean ± SD across folds), Wilcoxon signed-rank tests with "
        "Bonferroni correction and an ablation view, from the summary.json of each fold of each run.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="one folder per experiment (row name = folder name, or NAME=PATH), holding one "
                        "summary.json per fold at any depth, e.g. runs/full/fold0/test/summary.json")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--baseline", default=None,
                        help="run compared against the others (default: the first)")
    parser.add_argument("--metric", nargs="+", default=["dice"], choices=METRICS,
                        help="metric(s) given a significance test (default: dice)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="family-wise significance level")
    parser.add_argument("--pattern", nargs="+", default=[f"**/{SUMMARY_NAME}"],
                        help="glob(s) below each run selecting the fold summaries (default: **/summary.json); a "
                        "summary below a seedN folder is the unit (fold, seed N)")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    args = parser.parse_args(argv)
    runs = [load_run(name, path, args.pattern) for name, path in map(parse_run_spec, args.runs)]
    check_output(args.out, inputs=[file for run in runs for files in run.sources.values() for file in files],
                 overwrite=args.overwrite, kind="folder", names=REPORT_FILES)
    result = write_report(runs, args.out, baseline=args.baseline, metrics=args.metric, alpha=args.alpha)
    print((args.out / "report.md").read_text())
    n_tests = len(result["significance"])
    print(f"wrote {args.out}/report.md, table_*.csv, significance.csv ({n_tests} tests), ablation.csv, "
          "folds.csv, dice.png")
    return 0
