"""``aqcf report``: mean ± SD across folds, Wilcoxon + Bonferroni, ablation view, from hand-made summaries."""

from __future__ import annotations

import csv
import itertools
import json
import re

import numpy as np
import pytest

from aqcf.cli import main as aqcf_main
from aqcf.errors import AqcfError
from aqcf.evaluation import report as report_module
from aqcf.evaluation.report import load_run, min_exact_p, write_report
from aqcf.visualize.charts import run_colors
from tests.pictures import colour_at, keep_figures, read_png

# fold-wise per-case means, fold0..fold4; "full" is the baseline
TUMOR_CT = {
    "full": [0.70, 0.72, 0.74, 0.76, 0.78],
    "nogate": [0.69, 0.70, 0.77, 0.72, 0.73],  # differences vs full: -.01 -.02 +.03 -.04 -.05
    "real": [0.71, 0.70, 0.77, 0.72, 0.83],  # differences: +.01 -.02 +.03 -.04 +.05
}
LIVER_CT = {"full": [0.95, 0.94, 0.96, 0.95, 0.97], "nogate": [0.94, 0.93, 0.95, 0.94, 0.96],
            "real": [0.93, 0.92, 0.94, 0.93, 0.95]}
DICE_MRI = {"full": (0.96, 0.80), "nogate": (0.95, 0.78), "real": (0.94, 0.75)}  # liver, tumor; every fold
HD95_TUMOR_CT = {"full": [10.0, 12.0, 11.0, 13.0, 9.0], "nogate": [11.0, 12.5, 12.0, 14.0, 9.5],
                 "real": [12.0, 13.0, 12.5, 13.5, 10.0]}


def _stats(mean):
    return {"mean": mean, "std": None, "median": mean, "n": 4, "n_undefined": 0}


def _entry(dice, hd95=8.0, msd=2.0):
    return {"dice": _stats(dice), "hd95": _stats(hd95), "msd": _stats(msd), "pooled_dice": dice,
            "n_cases": 4, "n_ref_empty": 0}


def _write(path, per_modality):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"per_modality": per_modality}))


@pytest.fixture
def runs(tmp_path):
    for name in TUMOR_CT:
        for fold in range(5):
            ct = {"liver": _entry(LIVER_CT[name][fold]),
                  "tumor": _entry(TUMOR_CT[name][fold], hd95=HD95_TUMOR_CT[name][fold])}
            mri = {"liver": _entry(DICE_MRI[name][0]), "tumor": _entry(DICE_MRI[name][1])}
            if name == "real":  # CT and MRI evaluated into separate folders of one fold
                _write(tmp_path / name / f"fold_{fold}" / "ct" / "summary.json", {"ct": ct})
                _write(tmp_path / name / f"fold_{fold}" / "mri" / "summary.json", {"mri": mri})
            else:
                _write(tmp_path / name / f"fold{fold}" / "test" / "summary.json", {"ct": ct, "mri": mri})
    return tmp_path


def _exact_wilcoxon_p(differences):
    """Two-sided exact p-value by enumerating all 2^n sign assignments of the ranks."""
    ranks = np.argsort(np.argsort(np.abs(differences))) + 1
    observed = min(ranks[differences > 0].sum(), ranks[differences < 0].sum())
    sums = [sum(r for r, s in zip(ranks, signs, strict=True) if s) for signs in
            itertools.product((0, 1), repeat=len(ranks))]
    return min(1.0, 2 * np.mean([s <= observed for s in sums]))


def _load(root, names=("full", "nogate", "real")):
    return [load_run(name, root / name) for name in names]


def test_fold_keys_and_merged_modalities(runs):
    real = load_run("real", runs / "real")
    assert sorted(real.folds) == [f"fold{i}" for i in range(5)]
    assert set(real.folds["fold3"]) == {"ct", "mri"}


def test_table_mean_and_sd_across_folds(runs, tmp_path):
    result = write_report(_load(runs), tmp_path / "out")
    ct = {row["run"]: row for row in result["tables"]["ct"]}
    for name, values in TUMOR_CT.items():
        assert ct[name]["dice_tumor_mean"] == pytest.approx(np.mean(values))
        assert ct[name]["dice_tumor_sd"] == pytest.approx(np.std(values, ddof=1))
        assert ct[name]["n_folds"] == 5
    assert ct["nogate"]["hd95_tumor_mean"] == pytest.approx(np.mean(HD95_TUMOR_CT["nogate"]))
    markdown = (tmp_path / "out" / "report.md").read_text()
    # Dice shown in % with one decimal: full tumor 74.0 ± 3.2
    assert f"{100 * np.mean(TUMOR_CT['full']):.1f} ± {100 * np.std(TUMOR_CT['full'], ddof=1):.1f}" in markdown
    with open(tmp_path / "out" / "table_ct.csv", newline="") as handle:
        rows = {r["run"]: r for r in csv.DictReader(handle)}
    assert float(rows["real"]["dice_liver_mean"]) == pytest.approx(np.mean(LIVER_CT["real"]))


def test_wilcoxon_with_bonferroni(runs, tmp_path):
    result = write_report(_load(runs), tmp_path / "out", metrics=("dice", "hd95"))
    tests = {(r["modality"], r["class"], r["metric"], r["run"]): r for r in result["significance"]}
    for name in ("nogate", "real"):
        differences = np.array(TUMOR_CT[name]) - np.array(TUMOR_CT["full"])
        row = tests["ct", "tumor", "dice", name]
        expected = _exact_wilcoxon_p(differences)
        assert row["p"] == pytest.approx(expected)
        assert row["comparisons"] == 2
        assert row["p_bonferroni"] == pytest.approx(min(1.0, 2 * expected))
        assert row["mean_difference"] == pytest.approx(differences.mean())
    # hand count for "nogate": ranks 1..5, W- = 1+2+4+5 = 12, W+ = 3; P(W <= 3) = 5/32 -> p = 10/32
    assert tests["ct", "tumor", "dice", "nogate"]["p"] == pytest.approx(10 / 32)
    # "real": W+ = 1+3+5 = 9, W- = 6; P(W <= 6) = 13/32 -> p = 26/32, Bonferroni 52/32 capped at 1
    assert tests["ct", "tumor", "dice", "real"]["p"] == pytest.approx(26 / 32)
    assert tests["ct", "tumor", "dice", "real"]["p_bonferroni"] == 1.0
    # every liver fold of both runs is lower than the baseline: the smallest 5-fold p, 2/32
    assert tests["ct", "liver", "dice", "real"]["p"] == pytest.approx(0.0625)
    assert tests["ct", "liver", "dice", "real"]["p_bonferroni"] == pytest.approx(0.125)
    assert not tests["ct", "liver", "dice", "real"]["significant"]
    # HD95 of "nogate" is larger in all five folds (with tied differences): p = 2/32 as well
    assert tests["ct", "tumor", "hd95", "nogate"]["p"] == pytest.approx(2 / 32)
    assert "0.0625" in (tmp_path / "out" / "report.md").read_text()


def test_smallest_exact_p():
    assert min_exact_p(5) == pytest.approx(1 / 16)
    assert min_exact_p(6) == pytest.approx(1 / 32)


def test_ablation_view(runs, tmp_path):
    result = write_report(_load(runs), tmp_path / "out", baseline="full")
    rows = {r["run"]: r for r in result["ablation"]}
    per_fold = {name: [np.mean([LIVER_CT[name][f], TUMOR_CT[name][f], *DICE_MRI[name]]) for f in range(5)]
                for name in TUMOR_CT}
    for name, values in per_fold.items():
        assert rows[name]["mean_dice"] == pytest.approx(np.mean(values))
        assert rows[name]["sd"] == pytest.approx(np.std(values, ddof=1))
    full = np.mean(per_fold["full"])
    assert rows["real"]["change_percent"] == pytest.approx(100 * (np.mean(per_fold["real"]) - full) / full)
    assert np.isnan(rows["full"]["change_percent"])


def test_baseline_choice_and_errors(runs, tmp_path):
    result = write_report(_load(runs), tmp_path / "out", baseline="real")
    assert {r["baseline"] for r in result["significance"]} == {"real"}
    assert result["ablation"][0]["run"] == "real"
    with pytest.raises(AqcfError, match="baseline"):
        write_report(_load(runs), tmp_path / "out", baseline="nope")
    with pytest.raises(AqcfError, match="no \\*\\*/summary.json"):
        load_run("empty", tmp_path / "out")
    duplicate = runs / "real" / "fold_0" / "again" / "summary.json"
    _write(duplicate, {"ct": {"liver": _entry(0.9), "tumor": _entry(0.7)}})
    with pytest.raises(AqcfError, match="fold0 already has ct"):
        load_run("real", runs / "real")


def test_command_line(runs, tmp_path, capsys, monkeypatch):
    drawn = {}
    keep_figures(monkeypatch, report_module, drawn)
    out = tmp_path / "report"
    code = aqcf_main(["report", f"Full model={runs / 'full'}", str(runs / "nogate"), str(runs / "real"),
                      "--out", str(out), "--metric", "dice", "hd95"])
    assert code == 0
    assert "Full model" in capsys.readouterr().out
    for name in ("report.md", "table_ct.csv", "table_mri.csv", "significance.csv", "ablation.csv",
                 "folds.csv"):
        assert (out / name).stat().st_size > 0
    assert (out / "dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _check_dice_chart(read_png(out / "dice.png"), drawn["dice.png"])
    with open(out / "significance.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["baseline"] for r in rows} == {"Full model"}
    assert len(rows) == 2 * 2 * 2 * 2  # modalities x classes x metrics x compared runs


def test_undefined_distances_are_counted_and_flagged(runs, tmp_path):
    # nogate: fold1 and fold3 each had CT tumor cases with an empty prediction (HD95 undefined there)
    for fold, undefined in ((1, 2), (3, 1)):
        path = runs / "nogate" / f"fold{fold}" / "test" / "summary.json"
        summary = json.loads(path.read_text())
        summary["per_modality"]["ct"]["tumor"]["hd95"]["n_undefined"] = undefined
        path.write_text(json.dumps(summary))
    result = write_report(_load(runs), tmp_path / "out")
    ct = {row["run"]: row for row in result["tables"]["ct"]}
    assert ct["nogate"]["hd95_tumor_undefined"] == 3
    assert ct["full"]["hd95_tumor_undefined"] == 0
    assert ct["nogate"]["dice_tumor_undefined"] == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    nogate_ct = next(line for line in markdown.splitlines() if line.startswith("| nogate |"))
    assert nogate_ct.count("[3 undef.]") == 1
    assert re.findall(r"\[\d+ undef\.\]", markdown) == ["[3 undef.]"]
    assert "[k undef.]: k cases" in markdown


@pytest.mark.parametrize("n", [3, 10, 15, 20])
def test_chart_gives_every_run_its_own_colour(n):
    colors = run_colors(n)
    assert len(colors) == n
    assert len(set(colors)) == n


def _check_dice_chart(pixels, fig):
    """The Dice chart: a group per modality and class, in each a bar per run (baseline first, 0.8 / 3
    wide) in the run's colour up to its mean Dice (%) across folds, white above its error bar."""
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["CT liver", "CT tumor", "MRI liver", "MRI tumor"]
    names = ["Full model", "nogate", "real"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == names
    width = 0.8 / 3
    for i, (run, colour) in enumerate(zip(("full", "nogate", "real"), run_colors(3), strict=True)):
        for group, folds in enumerate((LIVER_CT[run], TUMOR_CT[run], [DICE_MRI[run][0]] * 5, [DICE_MRI[run][1]] * 5)):
            mean, sd = 100 * np.mean(folds), 100 * np.std(folds, ddof=1)
            x = group + (i - 1) * width
            np.testing.assert_allclose(colour_at(pixels, ax, x, mean / 2), colour, atol=0.02)
            np.testing.assert_allclose(colour_at(pixels, ax, x, min(mean + sd + 4.0, 99.0)), 1.0, atol=0.02)

