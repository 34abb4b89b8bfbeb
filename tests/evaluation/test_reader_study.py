"""Reader-study statistics against published textbook examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from aqcf.cli import main as aqcf_main
from aqcf.errors import AqcfError
from aqcf.evaluation.reader_study import cohen_kappa, icc_2_1, read_scores

# Shrout & Fleiss (1979), Table 2: 6 targets x 4 judges
SHROUT_FLEISS = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
# McGraw & Wong (1996), Table 6: 10 targets x 2 raters
MCGRAW_WONG = [
    [103, 119],
    [82, 65],
    [116, 106],
    [102, 102],
    [99, 105],
    [98, 100],
    [104, 107],
    [62, 85],
    [97, 101],
]
MCGRAW_WONG += [[107, 110]]


def test_icc_shrout_fleiss_published_values():
    result = icc_2_1(np.array(SHROUT_FLEISS))
    # published: BMS 11.24, JMS 32.49, EMS 1.02, ICC(2,1) = 0.29; CI as printed by R psych::ICC
    assert result.ms_rows == pytest.approx(11.24, abs=0.005)
    assert result.ms_cols == pytest.approx(32.49, abs=0.005)
    assert result.ms_error == pytest.approx(1.02, abs=0.005)
    assert result.icc == pytest.approx(0.290, abs=0.0005)
    assert result.ci_low == pytest.approx(0.019, abs=0.0005)
    assert result.ci_high == pytest.approx(0.76, abs=0.005)


def test_icc_two_raters_mcgraw_wong():
    # R psych::ICC on McGraw & Wong's Table 6: ICC2 0.720, 95% CI 0.228-0.922
    result = icc_2_1(np.array(MCGRAW_WONG))
    assert (result.n, result.k) == (10, 2)
    assert result.icc == pytest.approx(0.720, abs=0.0005)
    assert result.ci_low == pytest.approx(0.228, abs=0.0005)
    assert result.ci_high == pytest.approx(0.922, abs=0.0005)


def test_icc_two_columns_from_mean_squares():
    # judges 1 and 3 of Shrout & Fleiss: the two-way ANOVA written out by hand
    x = [(9, 5), (6, 3), (8, 6), (7, 2), (10, 6), (6, 4)]
    n, k = 6, 2
    grand = sum(a + b for a, b in x) / (n * k)  # 72 / 12 = 6
    ss_rows = k * sum(((a + b) / 2 - grand) ** 2 for a, b in x)
    col1, col3 = sum(a for a, _ in x) / n, sum(b for _, b in x) / n  # 46/6, 26/6
    ss_cols = n * ((col1 - grand) ** 2 + (col3 - grand) ** 2)
    ss_total = sum((v - grand) ** 2 for row in x for v in row)
    bms, jms = ss_rows / (n - 1), ss_cols / (k - 1)
    ems = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))
    expected = (bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n)
    assert icc_2_1(np.array(x)).icc == pytest.approx(expected)


def test_icc_perfect_agreement_and_bad_input():
    result = icc_2_1(np.array([[1, 1], [5, 5], [9, 9]]))
    assert result.icc == pytest.approx(1.0)
    with pytest.raises(AqcfError):
        icc_2_1(np.array([[3, 3], [3, 3]]))
    with pytest.raises(AqcfError):
        icc_2_1(np.array([[1, 2, 3]]))


def test_cohen_kappa_textbook():
    # Wikipedia's example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> p_o 0.7, p_e 0.5, kappa 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa([1, 1, 1], [1, 1, 1]))
    with pytest.raises(AqcfError):
        cohen_kappa([1, 0], [1])


def _write(path, rows, header="case,reader1_score,reader2_score,reader1_acceptable,reader2_acceptable"):
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_cli_writes_table_8(tmp_path, capsys):
    scores = _write(
        tmp_path / "scores.csv", ["c1,9,8,yes,yes", "c2,10,9,1,1", "c3,7,7,no,yes", "c4,8,6,true,no"]
    )
    assert aqcf_main(["reader-stats", str(scores), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    # R1: 9, 10, 7, 8 -> mean 8.5, SD sqrt(5/3) = 1.29; R2: 8, 9, 7, 6 -> 7.5, 1.29
    assert "| Segmentation quality | 8.5 ± 1.3 | 7.5 ± 1.3 |" in printed
    assert "75.0% (3/4)" in printed
    record = json.loads((tmp_path / "out" / "reader_study.json").read_text())
    assert record["score_mean"] == pytest.approx([8.5, 7.5])
    assert record["score_sd"] == pytest.approx([math.sqrt(5 / 3)] * 2)
    assert record["accepted"] == [3, 3]
    # labels (1,1), (1,1), (0,1), (1,0): p_o = 0.5, p_e = 0.75^2 + 0.25^2 = 0.625 -> kappa = -1/3
    assert record["kappa"] == pytest.approx(-1 / 3)
    assert (tmp_path / "out" / "reader_study.md").read_text().startswith("Reader study (N = 4 cases)")


def test_bad_csv_is_a_one_line_error(tmp_path, capsys):
    missing = _write(tmp_path / "missing.csv", ["c1,9,8"], header="case,reader1_score,reader2_score")
    assert aqcf_main(["reader-stats", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aqcf: error:") and "missing.csv" in err and "reader1_acceptable" in err
    assert len(err.splitlines()) == 1

    out_of_range = _write(tmp_path / "range.csv", ["c1,11,8,1,1", "c2,9,8,1,1"])
    with pytest.raises(AqcfError, match=r"range.csv:2: reader1_score 11 outside"):
        read_scores(out_of_range)
    bad_label = _write(tmp_path / "label.csv", ["c1,9,8,1,1", "c2,9,8,maybe,1"])
    with pytest.raises(AqcfError, match=r"label.csv:3: acceptability 'maybe'"):
        read_scores(bad_label)
