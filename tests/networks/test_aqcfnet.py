"""AQCFNet: shapes for every Table 7 ablation, the unimodal path, gates, gradients across streams."""

from __future__ import annotations

import pytest
import torch

from aqcf.cli import main as aqcf_main
from aqcf.networks.aqcfnet import DEFAULT_READING, READINGS, AQCFNet, count_parameters
from aqcf.networks.summary import main as summary_main
from aqcf.nn.attention import QuaternionAttentionGate
from aqcf.nn.quaternion import QuaternionConv3d, QuaternionConvTranspose3d, set_quaternion_product
from tests.networks.counts import expected_count

TINY = (2, 2, 4, 4, 8, 8)
SMALL_PATCH = (32, 32, 16)
ABLATIONS = {
    "full": {},
    "static gate": {"gate": "static"},
    "no cross-fusion": {"cross_fusion": False},
    "real-valued": {"algebra": "real"},
    "separate bottleneck": {"bottleneck": "separate"},
    "no attention gates": {"attention_gates": False},
}
GATE_KEYS = {f"stage{s}/{d}" for s in range(1, 5) for d in ("mri_to_ct", "ct_to_mri")}


def patch(batch=1, size=SMALL_PATCH):
    return torch.rand(batch, 1, *size)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_paper_patch_shapes_for_every_ablation(name):
    net = AQCFNet(widths=TINY, **ABLATIONS[name])
    with torch.no_grad():
        logits_ct, logits_mri = net(patch(size=(256, 256, 16)), patch(size=(256, 256, 16)))
    assert logits_ct.shape == logits_mri.shape == (1, 3, 256, 256, 16)
    assert torch.isfinite(logits_ct).all() and torch.isfinite(logits_mri).all()
    if name == "no cross-fusion":
        assert net.last_gates == {}
        assert net.fusion is None
    else:
        assert set(net.last_gates) == GATE_KEYS
        for gate in net.last_gates.values():
            assert gate.shape == (1,) and not gate.requires_grad
            assert 0.0 <= gate.item() <= 1.0
            if name == "static gate":
                assert gate.item() == 1.0


def test_gates_have_one_value_per_sample():
    net = AQCFNet(widths=TINY)
    net(patch(3), patch(3))
    assert all(g.shape == (3,) for g in net.last_gates.values())
    single = net.forward_single(patch(2), "ct")
    assert single.shape == (2, 3, *SMALL_PATCH)
    assert all(g.shape == (2,) for g in net.last_gates.values())


@pytest.mark.parametrize("modality", ["ct", "mri", "CT"])
@pytest.mark.parametrize("name", ["full", "separate bottleneck"])
def test_unimodal_path_equals_training_graph_with_zero_stream(modality, name):
    torch.manual_seed(3)
    net = AQCFNet(widths=TINY, **ABLATIONS[name])
    # move the norms' affine parameters off their initial values, so that a zero image does not give
    # zero features in the absent stream
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    x = patch(2)
    zero = torch.zeros_like(x)
    with torch.no_grad():
        single = net.forward_single(x, modality)
        gates_single = dict(net.last_gates)
        if modality.lower() == "ct":
            expected = net(x, zero)[0]
        else:
            expected = net(zero, x)[1]
    torch.testing.assert_close(single, expected, rtol=1e-6, atol=1e-6)
    for key, value in net.last_gates.items():
        torch.testing.assert_close(gates_single[key], value, rtol=1e-6, atol=1e-6)


def mri_encoder_gradient(net):
    logits_ct, _ = net(patch(), patch())
    target = torch.randint(0, 3, (1, *SMALL_PATCH))
    torch.nn.functional.cross_entropy(logits_ct, target).backward()
    grads = [p.grad for p in net.encoders["mri"].parameters()] + [p.grad for p in net.stems["mri"].parameters()]
    return sum(0.0 if g is None else g.abs().sum().item() for g in grads)


def test_ct_loss_reaches_mri_encoder_only_through_cross_fusion():
    assert mri_encoder_gradient(AQCFNet(widths=TINY)) > 0
    assert mri_encoder_gradient(AQCFNet(widths=TINY, cross_fusion=False)) == 0.0


@pytest.mark.parametrize("convs", [1, 2])  # the default has one
def test_shared_bottleneck_is_one_set_of_weights(convs):
    shared = AQCFNet(widths=TINY, bottleneck_convs=convs)
    separate = AQCFNet(widths=TINY, bottleneck="separate", bottleneck_convs=convs)
    q_in, q_out = TINY[-2], TINY[-1]
    # 3x3x3 quaternion convs (4 C_in C_out 27 weights each, no bias), each with an affine instance norm
    one_bottleneck = 4 * q_in * q_out * 27 + 2 * 4 * q_out + (convs - 1) * (4 * q_out * q_out * 27 + 2 * 4 * q_out)
    assert count_parameters(shared.bottleneck) == one_bottleneck
    assert count_parameters(separate) - count_parameters(shared) == one_bottleneck


def test_real_valued_ablation_has_about_four_times_the_parameters():
    quaternion = count_parameters(AQCFNet(widths=TINY))
    real = count_parameters(AQCFNet(widths=TINY, algebra="real"))
    # quaternion weights are exactly 1/4; norms, biases, the real stem, heads, ψ and gate MLPs are not
    assert 3.0 < real / quaternion < 4.0


def test_init_reproducible_under_manual_seed():
    def state(seed):
        torch.manual_seed(seed)
        return AQCFNet(widths=TINY).state_dict()

    a, b, c = state(11), state(11), state(12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bad_inputs_raise_clear_errors():
    net = AQCFNet(widths=TINY)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(patch(size=(32, 32, 8)), patch(size=(32, 32, 8)))
    with pytest.raises(ValueError, match="same batch size"):
        net(patch(2), patch(1))
    with pytest.raises(ValueError, match="expected"):
        net(torch.rand(1, 2, *SMALL_PATCH), torch.rand(1, 2, *SMALL_PATCH))
    with pytest.raises(ValueError, match="modality"):
        net.forward_single(patch(), "pet")
    with pytest.raises(ValueError, match="divisible by 16"):
        net.forward_single(patch(size=(24, 32, 16)), "mri")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gate": "learned"},
        {"algebra": "octonion"},
        {"bottleneck": "none"},
        {"widths": (2, 2)},
        {"widths": (2, 0, 4)},
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        AQCFNet(**kwargs)


def test_fewer_stages_change_the_divisor():
    net = AQCFNet(widths=(2, 2, 4))  # one downsampling stage
    logits_ct, _ = net(patch(size=(8, 6, 4)), patch(size=(8, 6, 4)))
    assert logits_ct.shape == (1, 3, 8, 6, 4)
    assert set(net.last_gates) == {"stage1/mri_to_ct", "stage1/ct_to_mri"}


def test_attention_gate_scales_each_skip_quaternion_by_one_real_factor():
    gate = QuaternionAttentionGate(8, 8, 4)
    x, g = torch.randn(2, 8, 4, 4, 4), torch.randn(2, 8, 4, 4, 4)
    out = gate(x, g)
    ratio = out / x
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    assert bool(((ratio >= 0) & (ratio <= 1)).all())


def test_summary_prints_the_total(capsys):
    widths = [str(w) for w in TINY]
    assert summary_main(["--widths", *widths]) == 0
    out = capsys.readouterr().out
    total = expected_count(TINY, **READINGS[DEFAULT_READING])  # the default network, by arithmetic
    assert f"{total:,}" in out and "total" in out and "31,500,000" in out
    assert aqcf_main(["summary", "--widths", *widths, "--algebra", "real", "--no-cross-fusion"]) == 0
    assert aqcf_main(["summary", "--widths", "2", "0", "4"]) == 2


def quaternion_layers(net):
    return [m for m in net.modules() if isinstance(m, (QuaternionConv3d, QuaternionConvTranspose3d))]


@pytest.mark.parametrize("product", ["dense", "fast", "auto"])
def test_quaternion_product_reaches_every_quaternion_layer(product):
    net = AQCFNet(widths=TINY, quaternion_product=product)
    layers = quaternion_layers(net)
    # per stream a stem and one conv per encoder stage; per A-QCF block one shared QConv_q/k/v and
    # QConv_out; one bottleneck conv; per stream and decoder stage the transposed conv, W_x and W_g of
    # the attention gate and two convs
    assert len(layers) == 2 * (1 + 1 * 4) + 4 * 4 + 1 + 2 * 4 * (1 + 2 + 2)
    assert {layer.product for layer in layers} == {product}
    set_quaternion_product(net, "dense")
    assert {layer.resolved_product("cpu") for layer in layers} == {"dense"}
    # the real ablation has no quaternion layer to set
    assert quaternion_layers(AQCFNet(widths=TINY, algebra="real", quaternion_product="fast")) == []


def test_fast_and_dense_networks_agree_and_share_checkpoints():
    torch.manual_seed(4)
    fast = AQCFNet(widths=TINY, quaternion_product="fast")
    torch.manual_seed(4)
    dense = AQCFNet(widths=TINY, quaternion_product="dense")
    # same initialisation, same keys: either loads the other's state_dict
    assert list(fast.state_dict()) == list(dense.state_dict())
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in fast.state_dict().items())
    with torch.no_grad():
        for module in dense.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.bias.uniform_(-0.5, 0.5)
    fast.load_state_dict(dense.state_dict())
    ct, mri = patch(), patch()
    with torch.no_grad():
        out_fast, out_dense = fast(ct, mri), dense(ct, mri)
    for a, b in zip(out_fast, out_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    dense.load_state_dict(fast.state_dict())


def test_bad_quaternion_product_raises():
    with pytest.raises(ValueError, match="product='sparse'"):
        AQCFNet(widths=TINY, quaternion_product="sparse")
