"""Reader study statistics (sections 4.1.2 and 4.6, Table 8): ``aqcf reader-stats scores.csv [--out DIR]``.

Input: a CSV with one row per case and the columns ``case``, ``reader1_score``, ``reader2_score``
(Likert quality scores), ``reader1_acceptable`` and ``reader2_acceptable`` (1/0, yes/no, true/false,
case-insensitive); their meaning and the accepted scale: docs/explain.md, *Reader study*.

Other columns (e.g. ``modality``, comments) are ignored. Output: per reader the mean ± SD (ddof = 1)
of the scores and the number and percentage of acceptable cases; the inter-reader ICC(2,1) of the
scores (two-way random effects, absolute agreement, single rater; Shrout & Fleiss 1979) with its
95% CI (the F-based interval of McGraw & Wong 1996, case 2A); Cohen's κ of the acceptability
labels. ``pingouin`` and scikit-learn would give the same numbers but neither is a dependency, and the
formulas are a few lines of numpy/scipy.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from aqcf.errors import AqcfError
from aqcf.io import check_output, write_text_atomic

__all__ = [
    "COLUMNS",
    "IccResult",
    "ReaderStudy",
    "icc_2_1",
    "cohen_kappa",
    "read_scores",
    "reader_study",
    "format_table",
    "write_reader_table",
    "main",
]

COLUMNS = ("case", "reader1_score", "reader2_score", "reader1_acceptable", "reader2_acceptable")
READERS = ("reader1", "reader2")
LIKERT_RANGE = (1.0, 10.0)
ALPHA = 0.05
_YES = {"1", "yes", "y", "true", "t", "acceptable"}
_NO = {"0", "no", "n", "false", "f", "unacceptable", "not acceptable"}


@dataclass(frozen=True)
class IccResult:
    """ICC(2,1) with its ANOVA mean squares and confidence interval.

    Attributes:
        icc: the coefficient.
        ci_low, ci_high: the ``1 - alpha`` confidence interval.
        ms_rows: mean square between targets (cases), Shrout & Fleiss' BMS.
        ms_cols: mean square between raters, JMS.
        ms_error: residual mean square, EMS.
        n: number of targets; k: number of raters.
    """

    icc: float
    ci_low: float
    ci_high: float
    ms_rows: float
    ms_cols: float
    ms_error: float
    n: int
    k: int


def icc_2_1(ratings: np.ndarray, alpha: float = ALPHA) -> IccResult:
    """ICC(2,1): two-way random, absolute agreement, single rater (McGraw & Wong's ICC(A,1)).

    Shrout & Fleiss (1979) case 2. With targets in rows and raters in columns, the two-way ANOVA
    without replication gives BMS (rows), JMS (columns) and EMS (residual), and

        ICC = (BMS - EMS) / (BMS + (k - 1) EMS + k (JMS - EMS) / n).

    The CI is McGraw & Wong's (1996) for case 2A, with Satterthwaite's degrees of freedom
    ``v = (a JMS + b EMS)^2 / ((a JMS)^2 / (k - 1) + (b EMS)^2 / ((n - 1)(k - 1)))``,
    ``a = k ICC / (n (1 - ICC))``, ``b = 1 + k ICC (n - 1) / (n (1 - ICC))``, and the upper
    ``alpha / 2`` quantiles ``F1 = F(n - 1, v)``, ``F2 = F(v, n - 1)``:

        low  = n (BMS - F1 EMS) / (F1 (k JMS + (k n - k - n) EMS) + n BMS)
        high = n (F2 BMS - EMS) / (k JMS + (k n - k - n) EMS + n F2 BMS)

    Args:
        ratings: (n targets, k raters), complete.
        alpha: 1 - confidence level.

    Returns:
        An :class:`IccResult`.
    """
    x = np.asarray(ratings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise AqcfError(f"ICC needs an (n targets >= 2, k raters >= 2) table, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise AqcfError("ICC needs complete ratings (no missing or non-finite value)")
    n, k = x.shape
    grand = x.mean()
    row_means, col_means = x.mean(axis=1), x.mean(axis=0)
    ms_rows = k * np.sum((row_means - grand) ** 2) / (n - 1)
    ms_cols = n * np.sum((col_means - grand) ** 2) / (k - 1)
    residual = x - row_means[:, None] - col_means[None, :] + grand
    df_error = (n - 1) * (k - 1)
    ms_error = np.sum(residual**2) / df_error
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    if denominator <= 0:
        raise AqcfError("ICC is undefined: the ratings do not vary")
    icc = (ms_rows - ms_error) / denominator

    if icc >= 1.0:  # no error variance: the interval collapses onto the estimate
        low = high = float(icc)
    else:
        a = k * icc / (n * (1.0 - icc))
        b = 1.0 + k * icc * (n - 1) / (n * (1.0 - icc))
        v = (a * ms_cols + b * ms_error) ** 2 / (
            (a * ms_cols) ** 2 / (k - 1) + (b * ms_error) ** 2 / df_error
        )
        f1 = stats.f.ppf(1.0 - alpha / 2.0, n - 1, v)
        f2 = stats.f.ppf(1.0 - alpha / 2.0, v, n - 1)
        c = k * ms_cols + (k * n - k - n) * ms_error
        low = n * (ms_rows - f1 * ms_error) / (f1 * c + n * ms_rows)
        high = n * (f2 * ms_rows - ms_error) / (c + n * f2 * ms_rows)
    return IccResult(
        float(icc), float(low), float(high), float(ms_rows), float(ms_cols), float(ms_error), n, k
    )


def cohen_kappa(labels_a: Sequence[object], labels_b: Sequence[object]) -> float:
    """Cohen's κ of two raters' categorical labels: ``(p_o - p_e) / (1 - p_e)``.

    ``p_o`` is the observed agreement, ``p_e`` the agreement expected from the two raters' marginal
    frequencies. κ is NaN when ``p_e = 1`` (both raters gave one and the same label to every case).

    Args:
        labels_a, labels_b: equal-length label sequences (any hashable categories).

    Returns:
        κ in [-1, 1], or NaN.
    """
    a, b = list(labels_a), list(labels_b)
    if len(a) != len(b) or not a:
        raise AqcfError(f"Cohen's kappa needs two equal, non-empty label lists, got {len(a)} and {len(b)}")
    categories = sorted(set(a) | set(b), key=str)
    index = {c: i for i, c in enumerate(categories)}
    table = np.zeros((len(categories), len(categories)))
    for x, y in zip(a, b, strict=True):
        table[index[x], index[y]] += 1
    table /= table.sum()
    p_observed = np.trace(table)
    p_expected = float(table.sum(axis=1) @ table.sum(axis=0))
    if math.isclose(p_expected, 1.0):
        return math.nan
    return float((p_observed - p_expected) / (1.0 - p_expected))


def _parse_acceptable(text: str, where: str) -> int:
    value = text.strip().lower()
    if value in _YES:
        return 1
    if value in _NO:
        return 0
    raise AqcfError(f"{where}: acceptability {text!r} is not 1/0, yes/no or true/false")


def read_scores(
    path: str | os.PathLike, scale: tuple[float, float] = LIKERT_RANGE
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read a reader-study CSV (columns :data:`COLUMNS`, see the module docstring).

    Args:
        path: the CSV file.
        scale: the Likert scale's (lowest, highest) score; scores outside it are an error.

    Returns:
        (case ids, scores (n, 2) float, acceptable (n, 2) int 0/1), columns reader 1 then reader 2.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise AqcfError(f"{path}: missing column(s) {', '.join(missing)} (expected {','.join(COLUMNS)})")
        reader.fieldnames = header
        cases, scores, acceptable = [], [], []
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            case = (row["case"] or "").strip()
            if not case:
                raise AqcfError(f"{where}: empty case id")
            if case in cases:
                raise AqcfError(f"{where}: case {case!r} appears twice")
            row_scores = []
            for reader_name in READERS:
                text = (row[f"{reader_name}_score"] or "").strip()
                try:
                    score = float(text)
                except ValueError:
                    raise AqcfError(f"{where}: {reader_name}_score {text!r} is not a number") from None
                if not scale[0] <= score <= scale[1]:
                    raise AqcfError(
                        f"{where}: {reader_name}_score {score:g} outside the scale {scale[0]:g}..{scale[1]:g}"
                    )
                row_scores.append(score)
            cases.append(case)
            scores.append(row_scores)
            acceptable.append([_parse_acceptable(row[f"{r}_acceptable"] or "", where) for r in READERS])
    if len(cases) < 2:
        raise AqcfError(f"{path}: needs at least two cases, found {len(cases)}")
    return cases, np.asarray(scores, dtype=np.float64), np.asarray(acceptable, dtype=int)


@dataclass(frozen=True)
class ReaderStudy:
    """Table 8: per-reader scores and acceptability, and the inter-reader agreement."""

    n_cases: int
    score_mean: tuple[float, float]
    score_sd: tuple[float, float]
    accepted: tuple[int, int]
    accepted_percent: tuple[float, float]
    icc: IccResult
    kappa: float
    alpha: float = ALPHA


def reader_study(scores: np.ndarray, acceptable: np.ndarray, alpha: float = ALPHA) -> ReaderStudy:
    """Compute Table 8 from the (n, 2) scores and (n, 2) 0/1 acceptability labels."""
    scores = np.asarray(scores, dtype=np.float64)
    acceptable = np.asarray(acceptable, dtype=int)
    n = scores.shape[0]
    return ReaderStudy(
        n_cases=n,
        score_mean=tuple(float(m) for m in scores.mean(axis=0)),
        score_sd=tuple(float(s) for s in scores.std(axis=0, ddof=1)),
        accepted=tuple(int(a) for a in acceptable.sum(axis=0)),
        accepted_percent=tuple(float(100.0 * a / n) for a in acceptable.sum(axis=0)),
        icc=icc_2_1(scores, alpha),
        kappa=cohen_kappa(acceptable[:, 0], acceptable[:, 1]),
        alpha=alpha,
    )


def format_table(study: ReaderStudy) -> str:
    """Table 8 in Markdown."""
    level = round(100 * (1 - study.alpha))
    r1, r2 = 0, 1
    icc = study.icc
    kappa = "n/a" if math.isnan(study.kappa) else f"{study.kappa:.2f}"
    return "\n".join(
        [
            f"Reader study (N = {study.n_cases} cases)",
            "",
            f"| Metric | R1 (Mean ± SD) | R2 (Mean ± SD) | ICC(2,1) ({level}% CI) | Cohen's κ |",
            "|---|---|---|---|---|",
            f"| Segmentation quality | {study.score_mean[r1]:.1f} ± {study.score_sd[r1]:.1f} "
            f"| {study.score_mean[r2]:.1f} ± {study.score_sd[r2]:.1f} "
            f"| {icc.icc:.2f} ({icc.ci_low:.2f}–{icc.ci_high:.2f}) | — |",
            f"| Clinical acceptability "
            f"| {study.accepted_percent[r1]:.1f}% ({study.accepted[r1]}/{study.n_cases}) "
            f"| {study.accepted_percent[r2]:.1f}% ({study.accepted[r2]}/{study.n_cases}) | — | {kappa} |",
        ]
    )


def write_reader_table(study: ReaderStudy, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``reader_study.md`` (Table 8) and ``reader_study.json`` (every number, full precision)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = asdict(study)
    record["kappa"] = None if math.isnan(study.kappa) else study.kappa
    write_text_atomic(out / "reader_study.md", format_table(study) + "\n")
    write_text_atomic(out / "reader_study.json", json.dumps(record, indent=2) + "\n")
    return out / "reader_study.md", out / "reader_study.json"


def main(argv: list[str] | None = None) -> int:
    """``aqcf reader-stats scores.csv [--out DIR] [--alpha 0.05] [--scale 1 10]``."""
    from aqcf.errors import ArgumentParser

    parser = ArgumentParser(
        prog="aqcf reader-stats",
        description="Reader study statistics (Table 8): mean ± SD per reader, ICC(2,1) with its CI, "
        "Cohen's kappa. "
        f"The CSV needs the columns {','.join(COLUMNS)}; acceptability is 1/0, yes/no or true/false.",
    )
    parser.add_argument("scores", type=Path, help="CSV with one row per case")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for reader_study.md and reader_study.json"
    )
    parser.add_argument("--alpha", type=float, default=ALPHA, help="1 - confidence level of the ICC interval")
    parser.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=LIKERT_RANGE,
        metavar=("LOW", "HIGH"),
        help="Likert scale range",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the tables already in --out")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        raise AqcfError(f"--alpha {args.alpha} outside (0, 1)")
    if not args.scores.is_file():
        raise AqcfError(f"{args.scores}: no such file")
    if args.out is not None:
        check_output(args.out, inputs=[args.scores], overwrite=args.overwrite, kind="folder",
                     names=("reader_study.md", "reader_study.json"))
    _, scores, acceptable = read_scores(args.scores, tuple(args.scale))
    study = reader_study(scores, acceptable, args.alpha)
    print(format_table(study))
    if args.out is not None:
        md, js = write_reader_table(study, args.out)
        print(f"\nwrote {md} and {js}")
    return 0
