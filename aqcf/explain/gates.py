"""Statistics of the A-QCF gate values λ over a test set (section 4.4.2, Table 6).

After each forward pass the network records its gates as a dict
``{"stage{s}/mri_to_ct": (B,), "stage{s}/ct_to_mri": (B,)}`` (s = 1..4; a gate of shape
(B, 1, 1, 1, 1) is flattened the same way). :class:`GateRecorder` collects those dicts over the test
set; :meth:`GateRecorder.table` gives the median and interquartile range per stage and direction, as
Table 6 reports them; :func:`write_gate_table` writes it as Markdown and CSV; :func:`plot_gates` draws
a box plot per stage and direction (with :func:`aqcf.visualize.charts.box_chart`).

The same recorder also collects the network's ``last_context_rms`` from unimodal passes (eq. 17): the
RMS of the gated context ``λ · C_raw`` the present stream receives from the zero-filled absent stream.
That stream is not zero inside the network (norm shifts, and the other direction fills it with the
present stream's features), so the context is not zero either; :func:`write_gate_table` puts these
magnitudes beside λ.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from aqcf.errors import AqcfError
from aqcf.io import write_text_atomic
from aqcf.visualize.canvas import save_figure
from aqcf.visualize.charts import box_chart

__all__ = [
    "DIRECTIONS",
    "GateRow",
    "GateRecorder",
    "gate_rows",
    "absent_context_key",
    "write_gate_table",
    "plot_gates",
]

# Table 6's column order; the first direction lets MRI features into the CT stream. A network of more
# streams (named cohorts) adds directions "<source>_to_<target>", ordered after these by name.
DIRECTIONS = ("mri_to_ct", "ct_to_mri")
DIRECTION_LABELS = {"mri_to_ct": "MRI → CT (λ_mri→ct)", "ct_to_mri": "CT → MRI (λ_ct→mri)"}
_KEY = re.compile(r"^stage(\d+)/(([a-z][a-z0-9_]*?)_to_([a-z][a-z0-9_]*))$")


class GateRow(NamedTuple):
    """One row of Table 6: the distribution of λ at one encoder stage in one direction.

    Quartiles are numpy's default (linear interpolation between order statistics, Hyndman & Fan
    type 7, as R's ``quantile`` default).
    """

    stage: int
    direction: str
    n: int
    median: float
    q1: float
    q3: float


def _as_array(value: object) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64).reshape(-1)


def _parse_key(key: str) -> tuple[int, str]:
    match = _KEY.match(str(key))
    if not match:
        raise AqcfError(f"gate key {key!r} is not 'stage<N>/<source>_to_<target>' (e.g. 'stage1/mri_to_ct')")
    return int(match.group(1)), match.group(2)


def _ends(direction: str) -> tuple[str, str]:
    """``"mri_to_ct"`` -> ``("mri", "ct")``."""
    source, _, target = direction.partition("_to_")
    return source, target


def _label(direction: str) -> str:
    if direction in DIRECTION_LABELS:
        return DIRECTION_LABELS[direction]
    source, target = _ends(direction)
    return f"{source.upper()} → {target.upper()} (λ_{source}→{target})"


def _directions(keys) -> list[str]:
    """The directions among ``(stage, direction)`` keys, in Table 6's order."""
    return sorted({direction for _, direction in keys}, key=lambda d: _order((0, d))[1:])


class GateRecorder:
    """Collects gate values λ over many forward passes.

    Example::

        recorder = GateRecorder()
        for batch in loader:
            net(ct, mri)                    # the network records its gates
            recorder.update(net.last_gates) # {"stage1/mri_to_ct": (B,), ...}
        write_gate_table(recorder.table(), "eval/")
    """

    def __init__(self) -> None:
        self._values: dict[tuple[int, str], list[np.ndarray]] = {}

    def update(self, gates: Mapping[str, object]) -> None:
        """Add one forward pass's gates: ``"stage{s}/{direction}"`` -> (B,) or (B, 1, 1, 1, 1) values."""
        for key, value in gates.items():
            values = _as_array(value)
            if not np.all(np.isfinite(values)):
                raise AqcfError(f"gate {key!r}: non-finite value")
            self._values.setdefault(_parse_key(key), []).append(values)

    def values(self) -> dict[tuple[int, str], np.ndarray]:
        """All recorded values: ``(stage, direction)`` -> 1-D array, in stage then Table 6 direction order."""
        return {key: np.concatenate(self._values[key]) for key in sorted(self._values, key=_order)}

    def table(self) -> list[GateRow]:
        """Median and quartiles per stage and direction (see :func:`gate_rows`)."""
        return gate_rows(self.values())

    def __len__(self) -> int:
        return sum(sum(v.size for v in chunks) for chunks in self._values.values())


def _order(key: tuple[int, str]) -> tuple[int, int, str]:
    stage, direction = key
    return (stage, DIRECTIONS.index(direction), "") if direction in DIRECTIONS else (stage, len(DIRECTIONS), direction)


def absent_context_key(key: str, present: str) -> bool:
    """Whether ``"stage{s}/{direction}"`` is a direction from an absent stream into ``present``
    (in a unimodal pass every other stream is absent)."""
    source, target = _ends(_parse_key(key)[1])
    return target == present and source != present


def gate_rows(values: Mapping[tuple[int, str], Sequence[float]]) -> list[GateRow]:
    """Table 6 rows from raw values: ``(stage, direction)`` -> λ values."""
    rows = []
    for stage, direction in sorted(values, key=_order):
        v = np.asarray(values[(stage, direction)], dtype=np.float64)
        if v.size == 0:
            continue
        q1, median, q3 = np.quantile(v, [0.25, 0.5, 0.75])
        rows.append(GateRow(stage, direction, int(v.size), float(median), float(q1), float(q3)))
    return rows


_CONTEXT_COLUMNS = ("absent_context_rms_n", "absent_context_rms_median", "absent_context_rms_q1",
                    "absent_context_rms_q3")


def _stage_table(title: str, by_key: Mapping[tuple[int, str], GateRow], cell) -> list[str]:
    """A Markdown table, one row per encoder stage and one column per direction, ``cell(row)`` in each."""
    directions = _directions(by_key)
    lines = [
        title,
        "",
        "| Encoder stage | " + " | ".join(_label(d) for d in directions) + " |",
        "|---|" + "---|" * len(directions),
    ]
    for stage in sorted({stage for stage, _ in by_key}):
        cells = ["—" if (stage, d) not in by_key else cell(by_key[(stage, d)]) for d in directions]
        lines.append(f"| Stage {stage} | " + " | ".join(cells) + " |")
    return lines


def write_gate_table(
    rows: Sequence[GateRow],
    out_dir: str | os.PathLike,
    digits: int = 2,
    context: Sequence[GateRow] | None = None,
) -> tuple[Path, Path]:
    """Write Table 6 as ``gates.md`` (Median [Q1, Q3] per stage and direction) and ``gates.csv``.

    Args:
        rows: from :meth:`GateRecorder.table`.
        out_dir: output folder (created).
        digits: decimals in the Markdown table (the CSV keeps full precision).
        context: optional rows of the RMS of ``λ · C_raw`` from the zero-filled absent stream in
            unimodal passes (one value per case); added as a second Markdown table and as the
            ``absent_context_rms_*`` columns of the CSV (empty where not measured).

    Returns:
        (Markdown path, CSV path).
    """
    if not rows:
        raise AqcfError("write_gate_table: no gate values were recorded")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    by_context = {(row.stage, row.direction): row for row in context or ()}
    writer.writerow(GateRow._fields + (_CONTEXT_COLUMNS if context else ()))
    for row in rows:
        extra = by_context.get((row.stage, row.direction))
        cells = ("",) * len(_CONTEXT_COLUMNS) if extra is None else (extra.n, extra.median, extra.q1, extra.q3)
        writer.writerow(tuple(row) + (cells if context else ()))
    write_text_atomic(out / "gates.csv", buffer.getvalue())

    by_key = {(row.stage, row.direction): row for row in rows}
    lines = _stage_table(
        "Adaptive gate values λ: Median [Q1, Q3] (n values)",
        by_key,
        lambda row: f"{row.median:.{digits}f} [{row.q1:.{digits}f}, {row.q3:.{digits}f}] (n={row.n})",
    )
    if context:
        lines += [""] + _stage_table(
            "Context from the zero-filled absent stream (unimodal pass, eq. 17): RMS of λ · C_raw added to the "
            "present stream, Median [Q1, Q3] (n cases); MRI → CT on CT cases, CT → MRI on MRI cases",
            by_context,
            lambda row: f"{row.median:.3g} [{row.q1:.3g}, {row.q3:.3g}] (n={row.n})",
        )
    write_text_atomic(out / "gates.md", "\n".join(lines) + "\n")
    return out / "gates.md", out / "gates.csv"


def plot_gates(
    data: Sequence[GateRow] | Mapping[tuple[int, str], Sequence[float]] | GateRecorder,
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Box plot of λ per stage, one box per direction, saved as a PNG (atomically).

    Raw values (a recorder or ``{(stage, direction): values}``) give ordinary box plots (whiskers at
    1.5 IQR, outliers as points); Table 6 rows give boxes of the median and IQR without whiskers,
    since the rows do not hold the extremes (:func:`aqcf.visualize.charts.box_chart` draws them).

    Args:
        data: a :class:`GateRecorder`, raw values, or rows from :meth:`GateRecorder.table`.
        path: destination ``.png``.
        title: optional title.

    Returns:
        The path written.
    """
    series, summarised = _gate_series(data)
    if not series:
        raise AqcfError(f"{path}: no gate values to plot")
    stages = sorted({stage for by_stage in series.values() for stage in by_stage})
    fig = box_chart(
        series,
        {stage: f"Stage {stage}" for stage in stages},
        summarised=summarised,
        ylabel="gate value λ",
        # λ comes from a sigmoid; fix the axis to [0, 1] then so that plots of different runs compare
        ylim=(-0.02, 1.02) if _within_unit(series) else None,
        title=title,
    )
    return save_figure(fig, path)


def _gate_series(
    data: Sequence[GateRow] | Mapping[tuple[int, str], Sequence[float]] | GateRecorder,
) -> tuple[dict[str, dict[int, np.ndarray]], bool]:
    """The plot's boxes: ``{direction label: {stage: values}}`` in Table 6's direction order.

    Returns:
        (series, summarised): raw λ values per box, or for Table 6 rows ``(q1, median, q3)`` per box
        and ``summarised`` True.
    """
    if isinstance(data, GateRecorder):
        data = data.values()
    if isinstance(data, Mapping):
        boxes = {key: np.asarray(values, dtype=np.float64).reshape(-1) for key, values in data.items()}
        summarised = False
    else:
        boxes = {(row.stage, row.direction): np.asarray([row.q1, row.median, row.q3]) for row in data}
        summarised = True
    series: dict[str, dict[int, np.ndarray]] = {}
    for direction in _directions(boxes):
        series[_label(direction)] = {
            stage: boxes[(stage, d)] for stage, d in sorted(boxes, key=_order) if d == direction
        }
    return series, summarised


def _within_unit(series: Mapping[str, Mapping[int, np.ndarray]]) -> bool:
    """Whether every plotted value (or quartile) lies in [0, 1]."""
    values = np.concatenate([np.ravel(v) for by_stage in series.values() for v in by_stage.values()])
    return bool(values.size and values.min() >= 0 and values.max() <= 1 and not math.isnan(values.sum()))
