"""AQCFNet with M named streams: M = 1, 2, 3 build and train, M = 2 is the two-stream network bit for bit
(outputs saved before the change, ``tests/data/reference/nstreams_reference.pt``), absent streams, the combination
rule of the A-QCF block, and the parameter count by arithmetic on submodules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aqcf.networks.aqcfnet import AQCFNet, count_parameters
from aqcf.networks.summary import main as summary_main
from aqcf.nn.fusion import AQCFBlock
from aqcf.nn.quaternion import quaternion_cat
from tests.networks.counts import expected_count

REFERENCE = Path(__file__).parents[1] / "data" / "reference" / "nstreams_reference.pt"
WIDTHS = (2, 4, 8, 8)  # two stages: inputs divisible by 4
PATCH = (16, 16, 16)
# every argument a reading changes, so that a change of the defaults does not change these networks
EXPLICIT = {"fusion_out_kernel": 3, "encoder_convs": 2, "decoder_convs": 2, "bottleneck_convs": 2}
STREAMS = {1: ("ct",), 2: ("ct", "mri"), 3: ("ct", "mri", "pet")}
WEIGHTS = ("separate", "shared")


def tiny(modalities, fusion_weights="separate", **kwargs):
    return AQCFNet(widths=WIDTHS, modalities=modalities, fusion_weights=fusion_weights, **EXPLICIT, **kwargs)


def shift_norms(net):
    """Learned-looking norm shifts, so that a zero-filled stream is not zero inside the network."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.bias.normal_()
    return net


def pair_keys(modalities, stages=2):
    return {f"stage{s}/{a}_to_{b}" for s in range(1, stages + 1) for a in modalities for b in modalities if a != b}


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("m", sorted(STREAMS))
def test_m_streams_build_run_and_train(m, weights):
    modalities = STREAMS[m]
    net = tiny(modalities, weights)
    images = {name: torch.randn(2, 1, *PATCH) for name in modalities}
    logits = net.forward_streams(images)
    assert list(logits) == list(modalities)
    assert all(y.shape == (2, 3, *PATCH) for y in logits.values())
    # one gate per ordered pair of streams per stage; none for a single stream
    assert set(net.last_gates) == set(net.last_context_rms) == pair_keys(modalities)
    assert all(g.shape == (2,) and 0 <= g.min() <= g.max() <= 1 for g in net.last_gates.values())
    assert (net.fusion is None) == (m == 1)
    sum(y.square().mean() for y in logits.values()).backward()
    # every parameter is in the graph (a gate MLP's ReLU may be dead at init, so some grads are zero)
    assert [name for name, p in net.named_parameters() if p.grad is None or not p.grad.isfinite().all()] == []
    assert all(p.grad.abs().sum() > 0 for name in modalities for p in net.encoders[name].parameters())
    # forward takes one batch per stream in modalities order
    with torch.no_grad():
        joint = net(*images.values())
    assert isinstance(joint, tuple) and len(joint) == m
    for name, y in zip(modalities, joint, strict=True):
        torch.testing.assert_close(y, logits[name].detach(), rtol=0, atol=0)


def _reference_state(ref):
    state, start = {}, 0
    for name, shape in zip(ref["names"], ref["shapes"], strict=True):
        n = torch.Size(shape).numel()
        state[name] = ref["flat"][start : start + n].view(shape)
        start += n
    assert start == ref["flat"].numel()
    return state


@pytest.fixture
def one_thread():
    """The reference was computed on one thread: CPU convolutions sum in another order on more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_two_streams_are_the_two_stream_network_bit_for_bit(weights, one_thread):
    saved = torch.load(REFERENCE, weights_only=True)
    ref, kwargs = saved[weights], saved["kwargs"]
    torch.manual_seed(0)
    net = AQCFNet(**kwargs, fusion_weights=weights, modalities=("ct", "mri")).eval()
    state = _reference_state(ref)
    # same names in the same order, and the same initialisation under the same seed (the reference
    # shifted the norm biases after building)
    assert list(net.state_dict()) == ref["names"]
    norm_biases = {f"{n}.bias" for n, m in net.named_modules() if isinstance(m, torch.nn.InstanceNorm3d)}
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items() if k not in norm_biases)
    net.load_state_dict(state, strict=True)
    assert count_parameters(net) == ref["flat"].numel()
    ct, mri = ref["ct"], ref["mri"]
    with torch.no_grad():
        for new, old in zip(net(ct, mri), ref["forward"], strict=True):
            assert torch.equal(new, old)
        assert list(net.last_gates) == list(ref["last_gates"])
        assert all(torch.equal(net.last_gates[k], v) for k, v in ref["last_gates"].items())
        assert all(torch.equal(net.last_context_rms[k], v) for k, v in ref["last_context_rms"].items())
        streams = net.forward_streams({"mri": mri, "ct": ct})
        assert torch.equal(streams["ct"], ref["forward"][0]) and torch.equal(streams["mri"], ref["forward"][1])
        for mode in ("zero-filled", "off"):
            for modality, x in (("ct", ct), ("mri", mri)):
                expected = ref[f"single/{modality}/{mode}"]
                assert torch.equal(net.forward_single(x, modality, absent_context=mode), expected)
                gates = ref[f"single_gates/{modality}/{mode}"]
                assert all(torch.equal(net.last_gates[k], v) for k, v in gates.items())
                present = net.forward_present({modality: x}, absent_context=mode)
                assert list(present) == [modality] and torch.equal(present[modality], expected)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_a_present_stream_equals_the_joint_pass_with_zeros_for_the_others(weights):
    modalities = STREAMS[3]
    net = shift_norms(tiny(modalities, weights)).eval()
    images = {name: torch.randn(1, 1, *PATCH) for name in modalities}
    decoded = []
    hooks = [net.decoders[name].register_forward_hook(lambda *_, n=name: decoded.append(n)) for name in modalities]
    with torch.no_grad():
        for name, x in images.items():
            zeros = {other: torch.zeros_like(x) for other in modalities if other != name}
            joint = net.forward_streams({name: x, **zeros})
            decoded.clear()
            present = net.forward_present({name: x})
            assert decoded == [name]  # the decoders of the streams not asked for are skipped
            assert list(present) == [name]
            torch.testing.assert_close(present[name], joint[name], rtol=0, atol=1e-6)
            assert torch.allclose(net.forward_single(x, name), joint[name], atol=1e-6)
            # the logits of an absent stream on request, and of two present streams
            other = next(o for o in modalities if o != name)
            asked = net.forward_present({name: x}, outputs=[other])
            assert list(asked) == [other] and torch.allclose(asked[other], joint[other], atol=1e-6)
        pair = dict(list(images.items())[:2])
        joint = net.forward_streams({**pair, "pet": torch.zeros_like(images["pet"])})
        both = net.forward_present(pair)
        assert list(both) == list(pair)
        assert all(torch.allclose(both[n], joint[n], atol=1e-6) for n in pair)
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("present", STREAMS[3])
def test_context_off_gives_qconv_out_of_features_and_zeros_at_every_stage(present, weights):
    modalities = STREAMS[3]
    net = shift_norms(tiny(modalities, weights)).eval()
    index = modalities.index(present)
    inputs, outputs = {}, {}

    def record(stage):
        def hook(module, args, out):
            inputs[stage], outputs[stage] = args[index], out[index]

        return hook

    hooks = [block.register_forward_hook(record(s)) for s, block in enumerate(net.fusion)]
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        off = net.forward_present({present: x}, absent_context="off")[present]
        for s, block in enumerate(net.fusion):
            f = inputs[s]
            expected = block.output(present).qconv_out(quaternion_cat([f, torch.zeros_like(f)]))
            assert torch.equal(outputs[s], expected)
            for source in modalities:
                if source != present:  # every direction from an absent source: λ = 0, no context
                    for target in modalities:
                        if target != source:
                            assert net.last_gates[f"stage{s + 1}/{source}_to_{target}"].eq(0).all()
                            assert net.last_context_rms[f"stage{s + 1}/{source}_to_{target}"].eq(0).all()
        assert set(net.last_gates) == pair_keys(modalities)
        zero_filled = net.forward_present({present: x})[present]
        rms = [float(net.last_context_rms[f"stage2/{s}_to_{present}"][0]) for s in modalities if s != present]
    for h in hooks:
        h.remove()
    assert min(rms) > 0  # the zero-filled streams do carry context into the present one
    assert not torch.equal(off, zero_filled)
    net.absent_context = "off"
    with torch.no_grad():
        assert torch.equal(net.forward_single(x, present), off)


def test_a_target_is_updated_from_the_sum_of_its_gated_contexts():
    modalities = ("ct", "mri", "pet")
    block = AQCFBlock(8, modalities=modalities).eval()
    f = {m: torch.randn(2, 8, 4, 3, 2) for m in modalities}
    with torch.no_grad():
        out = block(*f.values())
        assert len(out) == 3 + 6
        for i, t in enumerate(modalities):
            # recomputed from eqs. 4-9 with the direction modules' own layers
            context = 0
            for s in modalities:
                if s != t:
                    d = block.direction(f"{s}_to_{t}")
                    q, k, v = d.qconv_q(f[t]), d.qconv_k(f[s]), d.qconv_v(f[s])
                    c_raw = torch.softmax(q * k, dim=1) * v
                    pooled = torch.cat([f[t].mean(dim=(2, 3, 4)), c_raw.mean(dim=(2, 3, 4))], dim=1)
                    gate = torch.sigmoid(d.mlp(pooled)).view(-1, 1, 1, 1, 1)
                    context = context + gate * c_raw
                    assert torch.allclose(out[3 + block.directions.index((s, t))], gate, atol=1e-6)
            expected = block.output(t).qconv_out(quaternion_cat([f[t], context]))
            torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-6)
    # QConv_out of a target sits in the direction from its first source; the others have none
    assert block.directions == (("mri", "ct"), ("pet", "ct"), ("ct", "mri"), ("pet", "mri"),
                                ("ct", "pet"), ("mri", "pet"))
    with_out = {f"{s}_to_{t}" for s, t in block.directions if block.direction(f"{s}_to_{t}").qconv_out is not None}
    assert with_out == {"mri_to_ct", "ct_to_mri", "ct_to_pet"}
    shared = AQCFBlock(8, weights="shared", modalities=modalities)
    assert len({id(shared.direction(f"{s}_to_{t}")) for s, t in shared.directions}) == 1


def _stream_part(net, name):
    """Parameters one stream adds: stem, encoder, decoder, head (and its bottleneck if separate)."""
    parts = [net.stems[name], net.encoders[name], net.decoders[name], net.heads[name]]
    if net.bottleneck_mode == "separate":
        parts.append(net.bottleneck[name])
    return sum(count_parameters(p) for p in parts)


@pytest.mark.parametrize("bottleneck", ["shared", "separate"])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_three_streams_count_by_arithmetic_on_the_two_stream_parts(weights, bottleneck):
    two = tiny(STREAMS[2], weights, bottleneck=bottleneck)
    three = tiny(STREAMS[3], weights, bottleneck=bottleneck)
    expected = count_parameters(two) + _stream_part(two, "ct")
    if weights == "separate":
        for block in two.fusion:
            direction = count_parameters(block.direction("mri_to_ct"))
            qconv_out = count_parameters(block.direction("mri_to_ct").qconv_out)
            # 2 -> 6 directions, of which 2 -> 3 hold a QConv_out
            expected += (6 - 2) * (direction - qconv_out) + (3 - 2) * qconv_out
    assert count_parameters(three) == expected
    one = tiny(STREAMS[1], weights, bottleneck=bottleneck)
    fusion = sum(count_parameters(b) for b in two.fusion)
    assert count_parameters(one) == count_parameters(two) - _stream_part(two, "mri") - fusion
    if bottleneck == "shared":  # and by arithmetic on the widths alone
        for m, net in ((1, one), (2, two), (3, three)):
            assert count_parameters(net) == expected_count(WIDTHS, fusion_weights=weights, streams=m, **EXPLICIT)


def test_summary_prints_the_count_for_one_to_four_streams(capsys):
    args = ["--widths", *map(str, WIDTHS), "--fusion-weights", "separate", "--fusion-out-kernel", "3",
            "--encoder-convs", "2", "--decoder-convs", "2", "--bottleneck-convs", "2"]
    assert summary_main(args) == 0
    rows = {line.split()[2]: int(line.split()[3].replace(",", ""))
            for line in capsys.readouterr().out.splitlines() if line.startswith("M = ")}
    two = tiny(STREAMS[2])
    stream = _stream_part(two, "ct")
    direction = sum(count_parameters(b.mri_to_ct) - count_parameters(b.mri_to_ct.qconv_out) for b in two.fusion)
    qconv_out = sum(count_parameters(b.mri_to_ct.qconv_out) for b in two.fusion)
    neck = count_parameters(two.bottleneck)
    expected = {str(m): m * stream + m * (m - 1) * direction + (m if m > 1 else 0) * qconv_out + neck
                for m in (1, 2, 3, 4)}
    assert rows == expected
    assert rows["2"] == count_parameters(two)
    by_widths = {str(m): expected_count(WIDTHS, fusion_weights="separate", streams=m, **EXPLICIT) for m in range(1, 5)}
    assert rows == by_widths


@pytest.mark.parametrize(
    "modalities",
    ["ct", (), ("ct", "ct"), ("CT", "mri"), ("ct", "t1-mri"), ("ct", "1mri"), ("ct", "keys"), ("ct", "class"),
     ("ct", 3)],
)
def test_bad_modalities_raise(modalities):
    with pytest.raises(ValueError, match="modalities"):
        tiny(modalities)


def test_bad_stream_inputs_raise_clear_errors():
    net = tiny(STREAMS[3])
    x = torch.randn(1, 1, *PATCH)
    with pytest.raises(ValueError, match="no input for stream"):
        net.forward_streams({"ct": x, "mri": x})
    with pytest.raises(ValueError, match="same batch size"):
        net.forward_present({"ct": x, "pet": torch.randn(2, 1, *PATCH)})
    with pytest.raises(ValueError, match="modality 'spect'"):
        net.forward_present({"spect": x})
    with pytest.raises(ValueError, match="modality 'spect'"):
        net.forward_present({"ct": x}, outputs=["spect"])
    with pytest.raises(ValueError, match="one per stream"):
        net(x, x)
    with pytest.raises(ValueError, match="divisible by 4"):
        net.forward_single(torch.randn(1, 1, 16, 16, 6), "pet")
