"""Readings of section 3.2.3: the default network unchanged, the counts of every reading worked out by
hand from widths and kernels, every ``configs/readings/*.yaml`` trained a step on phantoms, and the
absent-context switch (eq. 10 at every stage)."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest
import torch

from aqcf.cli import main
from aqcf.networks.aqcfnet import PAPER_WIDTHS, READINGS, AQCFNet, count_parameters
from aqcf.networks.summary import main as summary_main
from aqcf.nn.fusion import CrossModalTransfer
from aqcf.nn.quaternion import quaternion_cat
from tests.conftest import REPO, tiny_fit_args
from tests.networks.counts import expected_count

READING_CONFIGS = REPO / "configs" / "readings"
TINY = (2, 2, 4, 4, 8, 8)
ONE_STEP = ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0"]

# state_dict of the network as first built (before the reading options): number of entries, trainable
# parameters and sha256 of "name:shape" lines in order, at paper and at tiny widths
FIRST_BUILT = {
    PAPER_WIDTHS: (530, 61_021_286, "173c0a9aea4bc8d02252dda0de1e65f36a0a18e502b3809921dc555b64d4f964"),
    TINY: (530, 127_898, "5f37e662ca4096fdc8c13bed4d77b503604fd6e2f1659672fff1ea2d0fc3f276"),
}


def _fingerprint(net) -> tuple[int, int, str]:
    sd = net.state_dict()
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items())
    return len(sd), count_parameters(net), hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("widths", sorted(FIRST_BUILT))
def test_current_reading_is_the_network_as_first_built(widths):
    with torch.device("meta"):
        current = AQCFNet(widths=widths, **READINGS["current"])
    assert _fingerprint(current) == FIRST_BUILT[widths]


def test_default_network_is_algorithm_1_with_shared_weights():
    with torch.device("meta"):
        default = AQCFNet()
        explicit = AQCFNet(fusion_weights="shared", fusion_out_kernel=3, encoder_convs=1, decoder_convs=2,
                           bottleneck_convs=1)
    assert _fingerprint(default) == _fingerprint(explicit)
    assert count_parameters(default) == expected_count(PAPER_WIDTHS, fusion_weights="shared", encoder_convs=1,
                                                       bottleneck_convs=1)
    assert all(block_.direction("mri_to_ct") is block_.direction("ct_to_mri") for block_ in default.fusion)


def test_arithmetic_reproduces_the_documented_default_count():
    assert expected_count(PAPER_WIDTHS) == 61_021_286


@pytest.mark.parametrize("name", sorted(READINGS))
@pytest.mark.parametrize("widths", [PAPER_WIDTHS, TINY])
def test_summary_counts_every_reading(name, widths, capsys):
    expected = expected_count(widths, **READINGS[name])
    args = ["--widths", *map(str, widths)]
    assert summary_main([*args, "--reading", name]) == 0
    out = capsys.readouterr().out
    total_line = next(row for row in out.splitlines() if row.startswith("total"))
    assert total_line.split()[1] == f"{expected:,}"
    growth = f"{100 * (expected / 31.5e6 - 1):+.1f}%"
    assert growth in out.splitlines()[-1]
    assert summary_main([*args, "--reading", "all"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith(f"{name} "))
    assert f"{expected:,}" in line and growth in line


def test_paper_readings_are_within_two_percent_of_the_paper():
    assert round(expected_count(PAPER_WIDTHS, **READINGS["paper-shared"]) / 1e5) == 320
    assert round(expected_count(PAPER_WIDTHS, **READINGS["paper-out1"]) / 1e5) == 309


def test_shared_fusion_weights_are_one_module_for_both_directions():
    net = AQCFNet(widths=TINY, fusion_weights="shared").eval()
    for block_ in net.fusion:
        assert block_.direction("mri_to_ct") is block_.direction("ct_to_mri")
    ct, mri = torch.randn(1, 1, 32, 32, 32), torch.randn(1, 1, 32, 32, 32)
    net(ct, mri)  # both directions run through the one module
    assert set(net.last_gates) == {f"stage{s}/{d}" for s in range(1, 5) for d in ("mri_to_ct", "ct_to_mri")}


@pytest.mark.parametrize("kwargs", [{"fusion_out_kernel": 5}, {"fusion_weights": "tied"}, {"encoder_convs": 0},
                                    {"decoder_convs": 1.5}, {"bottleneck_convs": True},
                                    {"absent_context": "none"}])
def test_bad_reading_options_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AQCFNet(widths=TINY, **kwargs)


# --------------------------------------------------------------------------------- shipped configs


def test_readings_ship_a_config_each():
    assert {p.stem for p in READING_CONFIGS.glob("*.yaml")} == set(READINGS)


@pytest.mark.parametrize("name", sorted(READINGS))
def test_reading_config_trains_with_its_network(name, tiny_phantoms, tmp_path):
    root = tmp_path / name
    config = READING_CONFIGS / f"{name}.yaml"
    assert main(["fit", *tiny_fit_args(tiny_phantoms, root, "--config", str(config), *ONE_STEP)]) == 0
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = {k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items() if k.startswith("network.")}
    reference = AQCFNet(widths=TINY, **READINGS[name])
    assert list(state) == list(reference.state_dict())
    total = sum(v.numel() for k, v in state.items() if "running_" not in k and "num_batches" not in k)
    assert total == expected_count(TINY, **READINGS[name])


# ------------------------------------------------------------------------ the absent-stream context


@pytest.mark.parametrize("modality", ["ct", "mri"])
@pytest.mark.parametrize("name", sorted(READINGS))
def test_absent_context_off_gives_qconv_out_of_features_and_zeros_at_every_stage(modality, name):
    net = AQCFNet(widths=TINY, **READINGS[name]).eval()
    with torch.no_grad():  # learned norm shifts: the zero-filled absent stream is not zero inside
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.bias.normal_()
    direction = "mri_to_ct" if modality == "ct" else "ct_to_mri"
    present = 0 if modality == "ct" else 1  # position of the present stream in the block's args / outputs
    inputs, outputs = {}, {}

    def record(stage):
        def hook(module, args, out):
            inputs[stage], outputs[stage] = args[present], out[present]

        return hook

    hooks = [block_.register_forward_hook(record(s)) for s, block_ in enumerate(net.fusion)]
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        off = net.forward_single(x, modality, absent_context="off")
        for s, block_ in enumerate(net.fusion):
            f = inputs[s]
            expected = block_.direction(direction).qconv_out(quaternion_cat([f, torch.zeros_like(f)]))
            torch.testing.assert_close(outputs[s], expected, rtol=0, atol=0)
            assert net.last_gates[f"stage{s + 1}/{direction}"].eq(0).all()
            assert net.last_context_rms[f"stage{s + 1}/{direction}"].eq(0).all()
        zero_filled = net.forward_single(x, modality)
        rms = [float(net.last_context_rms[f"stage{s}/{direction}"][0]) for s in range(2, 5)]
    for h in hooks:
        h.remove()
    # the zero-filled path does carry context from the absent stream past the first block
    assert min(rms) > 0
    assert not torch.equal(off, zero_filled)
    # the network attribute is the default of forward_single (what configs and checkpoints set)
    net.absent_context = "off"
    with torch.no_grad():
        torch.testing.assert_close(net.forward_single(x, modality), off, rtol=0, atol=0)


def test_context_rms_is_the_rms_of_the_gated_context():
    net = AQCFNet(widths=TINY, **READINGS["current"]).eval()  # a module per direction: one call hooked
    ct, mri = torch.randn(2, 1, 32, 32, 32), torch.randn(2, 1, 32, 32, 32)
    captured = {}
    transfer = net.fusion[1].mri_to_ct
    hook = transfer.register_forward_hook(lambda mod, args, out: captured.update(args=args) or None)
    with torch.no_grad():
        net(ct, mri)
        f_target, f_source = captured["args"][:2]
        context = transfer.compute_context(f_target, f_source)
        gated = transfer.compute_gate(f_target, context) * context
    hook.remove()
    expected = gated.pow(2).flatten(1).mean(1).sqrt()
    torch.testing.assert_close(net.last_context_rms["stage2/mri_to_ct"], expected)


@pytest.mark.parametrize("mode", ["off", "zero-filled", None])
def test_segment_passes_absent_context_to_the_network(mode, tiny_run, tiny_phantoms, tmp_path, monkeypatch):
    seen = []
    encode = AQCFNet._encode

    def spy(self, images, absent=()):
        seen.append(absent)
        return encode(self, images, absent)

    monkeypatch.setattr(AQCFNet, "_encode", spy)
    args = ["segment", str(tiny_phantoms / "LiTS" / "volume-0.nii"), "--modality", "ct",
            "--ckpt", str(tiny_run / "checkpoints" / "best.ckpt"), "--out", str(tmp_path), "--overlap", "0",
            "--no-progress", *(["--absent-context", mode] if mode else [])]
    assert main(args) == 0
    assert seen and set(seen) == {("mri",) if mode == "off" else ()}  # the MRI stream is the absent one


def test_explain_reports_the_context_from_the_zero_filled_stream(tiny_run, tmp_path):
    out = tmp_path / "explain"
    args = ["explain", "--ckpt", str(tiny_run / "checkpoints" / "best.ckpt"), "--out", str(out), "--cases", "1",
            "--method", "gradcam", "--no-progress"]
    assert main(args) == 0
    with open(out / "gates.csv", newline="") as handle:
        rows = {(int(r["stage"]), r["direction"]): r for r in csv.DictReader(handle)}
    for stage in (1, 2, 3, 4):
        for direction in ("mri_to_ct", "ct_to_mri"):  # one CT case (MRI->CT), one MRI case (CT->MRI)
            assert int(rows[(stage, direction)]["absent_context_rms_n"]) == 1
            if stage > 1:  # block 1's other direction has filled the absent stream
                assert float(rows[(stage, direction)]["absent_context_rms_median"]) > 0
    assert "Context from the zero-filled absent stream" in (out / "gates.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["gates"]["absent_context_rms"]) == 8


# --------------------------------------------------------------- checkpoints older than the readings


def test_a_checkpoint_older_than_the_readings_is_rebuilt_as_it_was_trained(tiny_phantoms, tmp_path):
    from aqcf.inference.predictor import Predictor

    root = tmp_path / "first"
    current = ["--config", str(READING_CONFIGS / "current.yaml")]
    assert main(["fit", *tiny_fit_args(tiny_phantoms, root, *current, *ONE_STEP)]) == 0
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for key in READINGS["current"]:  # as written before the options existed: the keys are absent
        del checkpoint["hyper_parameters"]["network"]["init_args"][key]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    trained = {k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items() if k.startswith("network.")}

    network = Predictor.from_checkpoint(old).network  # segment, explain, export
    assert isinstance(network.fusion[0].direction("mri_to_ct"), CrossModalTransfer)
    assert network.fusion[0].direction("mri_to_ct") is not network.fusion[0].direction("ct_to_mri")
    assert all(torch.equal(network.state_dict()[k], v) for k, v in trained.items())
    assert set(network.state_dict()) == set(trained)
    # aqcf test with today's default config (another reading) rebuilds the checkpoint's network
    assert main(["test", *tiny_fit_args(tiny_phantoms, tmp_path / "test"), "--ckpt_path", str(old),
                 "--trainer.limit_test_batches", "1"]) == 0
    assert (tmp_path / "test" / "test" / "summary.json").is_file()
    # fine-tuning from it with today's default config builds its network too (a strict load)
    assert main(["fit", *tiny_fit_args(tiny_phantoms, tmp_path / "tuned", "--init_from", str(old), *ONE_STEP)]) == 0
    tuned = torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert set(tuned["state_dict"]) == set(checkpoint["state_dict"])
