"""Gate statistics (Table 6) from known λ values."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb

from aqcf.errors import AqcfError
from aqcf.explain import gates as gates_module
from aqcf.explain.gates import GateRecorder, GateRow, plot_gates, write_gate_table
from tests.pictures import colour_at, keep_figures, read_png


def _recorder():
    recorder = GateRecorder()
    # two forward passes; stage 1 MRI->CT sees 0.1 .. 0.9, stage 1 CT->MRI 0.2, 0.4, 0.6, 0.8
    recorder.update(
        {
            "stage1/mri_to_ct": torch.tensor([0.9, 0.1, 0.5, 0.3]),
            "stage1/ct_to_mri": torch.tensor([0.8, 0.2]).view(2, 1, 1, 1, 1),
            "stage2/ct_to_mri": torch.tensor([0.25]),
        }
    )
    recorder.update(
        {
            "stage1/mri_to_ct": torch.tensor([0.2, 0.4, 0.6, 0.7, 0.8]),
            "stage1/ct_to_mri": torch.tensor([0.4, 0.6]).view(2, 1, 1, 1, 1),
            "stage2/ct_to_mri": torch.tensor([0.75]),
        }
    )
    return recorder


def test_table_from_known_values():
    rows = _recorder().table()
    # quartiles by linear interpolation at (n - 1) p:
    #   0.1..0.9 (n = 9): positions 2, 4, 6 -> 0.3, 0.5, 0.7
    #   0.2, 0.4, 0.6, 0.8 (n = 4): positions 0.75, 1.5, 2.25 -> 0.35, 0.5, 0.65
    #   0.25, 0.75 (n = 2): positions 0.25, 0.5, 0.75 -> 0.375, 0.5, 0.625
    expected = [
        GateRow(1, "mri_to_ct", 9, 0.5, 0.3, 0.7),
        GateRow(1, "ct_to_mri", 4, 0.5, 0.35, 0.65),
        GateRow(2, "ct_to_mri", 2, 0.5, 0.375, 0.625),
    ]
    assert [(r.stage, r.direction, r.n) for r in rows] == [(r.stage, r.direction, r.n) for r in expected]
    for row, want in zip(rows, expected, strict=True):
        assert (row.median, row.q1, row.q3) == pytest.approx((want.median, want.q1, want.q3))


def test_bad_key_and_values():
    with pytest.raises(AqcfError):
        GateRecorder().update({"stage1/ct2mri": torch.tensor([0.5])})
    with pytest.raises(AqcfError):
        GateRecorder().update({"stage1/ct_to_mri": torch.tensor([float("nan")])})


def test_write_gate_table(tmp_path):
    md, csv_path = write_gate_table(_recorder().table(), tmp_path / "eval")
    text = md.read_text()
    assert "| Stage 1 | 0.50 [0.30, 0.70] (n=9) | 0.50 [0.35, 0.65] (n=4) |" in text
    assert "| Stage 2 | — | 0.50 [0.38, 0.62] (n=2) |" in text
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["direction"] for r in rows] == ["mri_to_ct", "ct_to_mri", "ct_to_mri"]
    assert float(rows[0]["q3"]) == pytest.approx(0.7) and int(rows[0]["n"]) == 9
    with pytest.raises(AqcfError):
        write_gate_table([], tmp_path)


def test_gate_table_with_the_absent_stream_context(tmp_path):
    context = GateRecorder()
    # RMS of λ·C per case: CT cases see MRI->CT context, MRI cases CT->MRI
    context.update({"stage1/mri_to_ct": torch.tensor([4.0]), "stage2/mri_to_ct": torch.tensor([1.0])})
    context.update({"stage1/mri_to_ct": torch.tensor([2.0]), "stage2/mri_to_ct": torch.tensor([3.0])})
    context.update({"stage1/ct_to_mri": torch.tensor([0.5])})
    md, csv_path = write_gate_table(_recorder().table(), tmp_path, context=context.table())
    text = md.read_text()
    # medians of (2, 4) and (1, 3); quartiles at 0.25 and 0.75 of the way
    assert "| Stage 1 | 3 [2.5, 3.5] (n=2) | 0.5 [0.5, 0.5] (n=1) |" in text
    assert "| Stage 2 | 2 [1.5, 2.5] (n=2) | — |" in text
    with csv_path.open() as handle:
        rows = {(r["stage"], r["direction"]): r for r in csv.DictReader(handle)}
    assert float(rows[("1", "mri_to_ct")]["absent_context_rms_median"]) == 3.0
    assert int(rows[("1", "ct_to_mri")]["absent_context_rms_n"]) == 1
    assert rows[("2", "ct_to_mri")]["absent_context_rms_median"] == ""  # stage 2 CT->MRI: no MRI context row
    assert float(rows[("1", "mri_to_ct")]["median"]) == 0.5  # λ columns unchanged


@pytest.mark.parametrize("source", ["recorder", "rows"])
def test_plot_gates(tmp_path, source, monkeypatch):
    recorder = _recorder()
    data = recorder if source == "recorder" else recorder.table()
    drawn = {}
    keep_figures(monkeypatch, gates_module, drawn)
    path = plot_gates(data, tmp_path / "gates.png", title="λ")
    pixels = read_png(path)
    ax = drawn["gates.png"].axes[0]
    # the boxes of the PNG, from the quartiles of test_table_from_known_values: MRI -> CT (first colour)
    # 0.175 left of each stage, CT -> MRI (second colour) 0.175 right, facecolour at opacity 0.8 on white
    mri_to_ct, ct_to_mri = (0.8 * np.asarray(to_rgb(c)) + 0.2 for c in ("#d95f02", "#1b9e77"))
    np.testing.assert_allclose(colour_at(pixels, ax, 0.825, 0.4), mri_to_ct, atol=0.03)  # stage 1: 0.3..0.7
    np.testing.assert_allclose(colour_at(pixels, ax, 1.175, 0.42), ct_to_mri, atol=0.03)  # stage 1: 0.35..0.65
    np.testing.assert_allclose(colour_at(pixels, ax, 2.175, 0.45), ct_to_mri, atol=0.03)  # stage 2: 0.375..0.625
    for y in (0.2, 0.8):  # outside stage 2's CT -> MRI box: the white background
        np.testing.assert_allclose(colour_at(pixels, ax, 2.175, y), 1.0, atol=0.02)
    assert ax.get_ylim() == (-0.02, 1.02)  # every λ in [0, 1]: the fixed axis
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Stage 1", "Stage 2"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["MRI → CT (λ_mri→ct)", "CT → MRI (λ_ct→mri)"]


def test_three_stream_gates_get_a_column_per_direction_and_the_absent_contexts(tmp_path):
    from aqcf.explain.gates import absent_context_key
    from aqcf.networks.aqcfnet import AQCFNet

    net = AQCFNet(widths=(2, 2, 4, 4), modalities=("ct", "mri", "t2")).eval()
    recorder = GateRecorder()
    with torch.no_grad():
        net(*(torch.rand(2, 1, 16, 16, 16) for _ in range(3)))
    recorder.update(net.last_gates)
    rows = recorder.table()
    directions = ["mri_to_ct", "ct_to_mri", "ct_to_t2", "mri_to_t2", "t2_to_ct", "t2_to_mri"]
    assert [(r.stage, r.direction) for r in rows] == [(s, d) for s in (1, 2) for d in directions]
    assert all(r.n == 2 for r in rows)
    md, _ = write_gate_table(rows, tmp_path)
    header = md.read_text().splitlines()[2]
    assert header.count("|") == 8 and "T2 → CT (λ_t2→ct)" in header and "MRI → CT (λ_mri→ct)" in header
    plot_gates(rows, tmp_path / "gates.png")
    # in a unimodal T2 pass both other streams are absent: their directions into T2 are the absent context
    into_t2 = [k for k in net.last_gates if absent_context_key(k, "t2")]
    assert sorted(into_t2) == ["stage1/ct_to_t2", "stage1/mri_to_t2", "stage2/ct_to_t2", "stage2/mri_to_t2"]
    with pytest.raises(AqcfError, match="source"):
        recorder.update({"stage1/ct": torch.ones(1)})
