"""Quaternion layers against products built from the textbook unit table (i² = j² = k² = ijk = -1)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from aqcf.errors import AqcfError
from aqcf.nn.quaternion import (
    QuaternionConv3d,
    QuaternionConvTranspose3d,
    hamilton_product,
    quaternion_cat,
    resolve_product,
    set_quaternion_product,
)

PRODUCTS = ["dense", "fast"]

# unit products: (a, b) -> (sign, c) with e_a e_b = sign e_c; units 0=1, 1=i, 2=j, 3=k
UNIT_TABLE = {
    (0, 0): (1, 0), (0, 1): (1, 1), (0, 2): (1, 2), (0, 3): (1, 3),
    (1, 0): (1, 1), (1, 1): (-1, 0), (1, 2): (1, 3), (1, 3): (-1, 2),
    (2, 0): (1, 2), (2, 1): (-1, 3), (2, 2): (-1, 0), (2, 3): (1, 1),
    (3, 0): (1, 3), (3, 1): (1, 2), (3, 2): (-1, 1), (3, 3): (-1, 0),
}  # fmt: skip


def table_product(q, p):
    """q ⊗ p for two sequences of 4 numbers (or broadcastable tensors), by distributing over units."""
    out = [0.0, 0.0, 0.0, 0.0]
    for (a, b), (sign, c) in UNIT_TABLE.items():
        out[c] = out[c] + sign * q[a] * p[b]
    return out


def components(weights):
    return [
        weights.r_weight.detach(),
        weights.i_weight.detach(),
        weights.j_weight.detach(),
        weights.k_weight.detach(),
    ]


def test_unit_table_matches_hamilton_rules():
    one, i, j, k = ([float(n == m) for n in range(4)] for m in range(4))
    assert table_product(i, j) == k
    assert table_product(j, i) == [-v for v in k]
    assert table_product(i, table_product(j, k)) == [-1.0, 0.0, 0.0, 0.0]


def test_hamilton_product_is_the_textbook_product():
    q = torch.randn(2, 4 * 3, 2, 2, 2)
    p = torch.randn(2, 4 * 3, 2, 2, 2)
    expected = torch.cat(table_product(torch.chunk(q, 4, dim=1), torch.chunk(p, 4, dim=1)), dim=1)
    torch.testing.assert_close(hamilton_product(q, p), expected)
    # non-commutative
    assert not torch.allclose(hamilton_product(q, p), hamilton_product(p, q))


def test_quaternion_cat_interleaves_components():
    a = torch.arange(4.0).view(1, 4, 1, 1, 1)  # one quaternion channel: r=0, i=1, j=2, k=3
    b = 10 + torch.arange(8.0).view(1, 8, 1, 1, 1)  # two channels: r=10,11 i=12,13 j=14,15 k=16,17
    out = quaternion_cat([a, b]).flatten().tolist()
    assert out == [0, 10, 11, 1, 12, 13, 2, 14, 15, 3, 16, 17]


@pytest.mark.parametrize("product", PRODUCTS)
def test_conv_1x1x1_is_left_hamilton_product_per_voxel(product):
    layer = QuaternionConv3d(4 * 2, 4 * 3, kernel_size=1, product=product)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(1, 4 * 2, 2, 3, 2)
    out = layer(x)
    w = components(layer)
    bias = layer.bias.detach()
    for o, (vx, vy, vz) in itertools.product(range(3), itertools.product(range(2), range(3), range(2))):
        expected = [bias[c * 3 + o].item() for c in range(4)]
        for i in range(2):
            wq = [w[c][o, i, 0, 0, 0].item() for c in range(4)]
            xq = [x[0, c * 2 + i, vx, vy, vz].item() for c in range(4)]
            expected = [e + t for e, t in zip(expected, table_product(wq, xq), strict=True)]
        got = [out[0, c * 3 + o, vx, vy, vz].item() for c in range(4)]
        assert got == pytest.approx(expected, abs=1e-5)


def expected_conv3x3x3(w, x, q_out):
    """Sum over kernel offsets of W[offset] ⊗ x[voxel + offset - 1] (zero padding 1)."""
    xc = torch.chunk(torch.nn.functional.pad(x, (1, 1) * 3), 4, dim=1)
    size = x.shape[2:]
    out = [torch.zeros(x.shape[0], q_out, *size, dtype=x.dtype) for _ in range(4)]
    for dx, dy, dz in itertools.product(range(3), repeat=3):
        shifted = [c[:, :, dx : dx + size[0], dy : dy + size[1], dz : dz + size[2]] for c in xc]
        for (a, b), (sign, c) in UNIT_TABLE.items():
            out[c] += sign * torch.einsum("oi,bixyz->boxyz", w[a][:, :, dx, dy, dz], shifted[b])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("product", PRODUCTS)
def test_conv_3x3x3_sums_hamilton_products_over_offsets(product):
    layer = QuaternionConv3d(4 * 2, 4 * 3, kernel_size=3, bias=False, product=product)
    x = torch.randn(2, 4 * 2, 5, 4, 6)
    expected = expected_conv3x3x3(components(layer), x, 3)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("product", PRODUCTS)
def test_strided_conv_subsamples_the_same_products(product):
    layer = QuaternionConv3d(4, 8, kernel_size=3, stride=2, bias=False, product=product)
    x = torch.randn(1, 4, 8, 6, 4)
    expected = expected_conv3x3x3(components(layer), x, 2)[:, :, ::2, ::2, ::2]
    out = layer(x)
    assert out.shape == (1, 8, 4, 3, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("product", PRODUCTS)
def test_transposed_conv_scatters_w_times_x(product):
    layer = QuaternionConvTranspose3d(4 * 2, 4 * 3, kernel_size=2, stride=2, product=product)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(1, 4 * 2, 2, 3, 2)
    out = layer(x)
    assert out.shape == (1, 12, 4, 6, 4)
    w = components(layer)  # sub-kernels are (in, out, kx, ky, kz)
    bias = layer.bias.detach()
    for vx, vy, vz in itertools.product(range(2), range(3), range(2)):
        for ox, oy, oz in itertools.product(range(2), repeat=3):
            for o in range(3):
                expected = [bias[c * 3 + o].item() for c in range(4)]
                for i in range(2):
                    wq = [w[c][i, o, ox, oy, oz].item() for c in range(4)]
                    xq = [x[0, c * 2 + i, vx, vy, vz].item() for c in range(4)]
                    expected = [e + t for e, t in zip(expected, table_product(wq, xq), strict=True)]
                got = [out[0, c * 3 + o, 2 * vx + ox, 2 * vy + oy, 2 * vz + oz].item() for c in range(4)]
                assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("product", PRODUCTS)
def test_transposed_conv_is_not_the_conjugate_product(product):
    layer = QuaternionConvTranspose3d(4, 4, kernel_size=1, stride=1, bias=False, product=product)
    x = torch.randn(1, 4, 1, 1, 1)
    wq = [c[0, 0, 0, 0, 0].item() for c in components(layer)]
    xq = x.flatten().tolist()
    conj = [wq[0], -wq[1], -wq[2], -wq[3]]
    got = layer(x).flatten().tolist()
    assert got == pytest.approx(table_product(wq, xq), abs=1e-6)
    assert got != pytest.approx(table_product(conj, xq), abs=1e-3)


@pytest.mark.parametrize("kernel", [1, 3])
def test_a_quarter_of_the_real_parameters(kernel):
    quaternion = QuaternionConv3d(4 * 6, 4 * 5, kernel, bias=False)
    real = nn.Conv3d(4 * 6, 4 * 5, kernel, bias=False)
    assert 4 * sum(p.numel() for p in quaternion.parameters()) == sum(p.numel() for p in real.parameters())
    assert sum(p.numel() for p in quaternion.parameters()) == 4 * 5 * 6 * kernel**3  # eq. 3
    up = QuaternionConvTranspose3d(4 * 6, 4 * 5, 2, stride=2, bias=False)
    real_up = nn.ConvTranspose3d(4 * 6, 4 * 5, 2, stride=2, bias=False)
    assert 4 * sum(p.numel() for p in up.parameters()) == sum(p.numel() for p in real_up.parameters())


@pytest.mark.parametrize("layer", [QuaternionConv3d, QuaternionConvTranspose3d])
@pytest.mark.parametrize(("c_in", "c_out"), [(6, 8), (8, 10), (0, 8)])
def test_channels_not_a_multiple_of_four_raise(layer, c_in, c_out):
    with pytest.raises(ValueError, match="multiple of 4"):
        layer(c_in, c_out, 3)


def test_init_reproducible_under_manual_seed():
    torch.manual_seed(7)
    a = QuaternionConv3d(8, 8, 3)
    torch.manual_seed(7)
    b = QuaternionConv3d(8, 8, 3)
    torch.manual_seed(8)
    c = QuaternionConv3d(8, 8, 3)
    for name in ("r_weight", "i_weight", "j_weight", "k_weight"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))


@pytest.mark.parametrize("init", ["he", "glorot"])
def test_init_modulus_has_the_chi4_scale(init):
    q_in, q_out, kernel = 32, 48, 3
    layer = QuaternionConv3d(4 * q_in, 4 * q_out, kernel, init=init)
    fan_in, fan_out = q_in * kernel**3, q_out * kernel**3
    sigma2 = 1 / (2 * fan_in) if init == "he" else 1 / (2 * (fan_in + fan_out))
    squared_modulus = sum(w**2 for w in components(layer))
    # E|w|² of chi(4) with scale σ is 4σ²; 41k samples give ~0.5% standard error
    assert squared_modulus.mean().item() == pytest.approx(4 * sigma2, rel=0.03)
    # uniform phase: E[cos² θ] = 1/2, so the real part carries half of the energy (2σ²)
    assert (components(layer)[0] ** 2).mean().item() == pytest.approx(2 * sigma2, rel=0.05)
    assert layer.bias.abs().max().item() == 0.0
    assert math.isfinite(squared_modulus.max().item())


# the fast product (8 multiplications) against the textbook product and against the dense path

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def assert_relative_close(actual, expected, rel):
    """Largest deviation within ``rel`` of the largest magnitude (sums of many products cancel)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= rel * scale, (actual - expected).abs().max().item() / scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("size", "stride"), [((5, 4, 7), 1), ((5, 7, 3), 2), ((6, 6, 4), 2)])
def test_fast_conv_and_its_gradients_follow_the_unit_table(dtype, size, stride):
    torch.manual_seed(0)
    layer = QuaternionConv3d(4 * 3, 4 * 2, kernel_size=3, stride=stride, product="fast").to(dtype)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 4 * 3, *size, dtype=dtype, requires_grad=True)
    out = layer(x)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()

    # the same sum of products by the table, differentiated by autograd through einsum
    w = [c.detach().clone().requires_grad_() for c in components(layer)]
    x_ref = x.detach().clone().requires_grad_()
    bias = layer.bias.detach().view(1, -1, 1, 1, 1)
    expected = expected_conv3x3x3(w, x_ref, 2)[:, :, ::stride, ::stride, ::stride] + bias
    (expected * upstream).sum().backward()

    rel = TOLERANCE[dtype]
    assert_relative_close(out.detach(), expected.detach(), rel)
    assert_relative_close(x.grad, x_ref.grad, rel)
    for name, ref in zip(("r_weight", "i_weight", "j_weight", "k_weight"), w, strict=True):
        assert_relative_close(getattr(layer, name).grad, ref.grad, rel)
    assert_relative_close(layer.bias.grad, upstream.sum(dim=(0, 2, 3, 4)), rel)


LAYER_CASES = {
    "conv k1": (QuaternionConv3d, {"kernel_size": 1}, (2, 3, 5, 7)),
    "conv k1 stride 2": (QuaternionConv3d, {"kernel_size": 1, "stride": 2}, (1, 5, 4, 3)),
    "conv k1 padding 1": (QuaternionConv3d, {"kernel_size": 1, "padding": 1}, (1, 3, 2, 4)),
    "conv k3": (QuaternionConv3d, {"kernel_size": 3}, (2, 5, 3, 6)),
    "conv k3 stride 2": (QuaternionConv3d, {"kernel_size": 3, "stride": 2}, (1, 7, 5, 4)),
    "conv k3 dilation 2": (QuaternionConv3d, {"kernel_size": 3, "dilation": 2}, (1, 7, 5, 6)),
    "transposed k2 stride 2": (QuaternionConvTranspose3d, {"kernel_size": 2, "stride": 2}, (2, 3, 5, 2)),
    "transposed k221 stride 221": (
        QuaternionConvTranspose3d,
        {"kernel_size": (2, 2, 1), "stride": (2, 2, 1)},
        (2, 3, 1, 4),
    ),
    "transposed k3 stride 3": (QuaternionConvTranspose3d, {"kernel_size": 3, "stride": 3}, (1, 2, 3, 2)),
    "transposed k1 stride 1": (QuaternionConvTranspose3d, {"kernel_size": 1}, (2, 3, 4, 2)),
    "transposed k2 stride 2 output padding 1": (
        QuaternionConvTranspose3d,
        {"kernel_size": 2, "stride": 2, "output_padding": 1},
        (1, 3, 2, 2),
    ),
    "transposed k3 stride 2": (
        QuaternionConvTranspose3d,
        {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1},
        (1, 3, 4, 5),
    ),
}


def forward_backward(layer, x, upstream_seed=1):
    """Output and gradients w.r.t. the input, the four sub-kernels and the bias."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(upstream_seed))
    (out * upstream).sum().backward()
    params = ("r_weight", "i_weight", "j_weight", "k_weight", "bias")
    return {"output": out.detach(), "input": x.grad} | {name: getattr(layer, name).grad for name in params}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_fast_and_dense_give_the_same_output_and_gradients(case, dtype):
    cls, kwargs, (batch, *size) = LAYER_CASES[case]
    torch.manual_seed(0)
    layer = cls(4 * 3, 4 * 5, **kwargs).to(dtype)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(batch, 4 * 3, *size, dtype=dtype)
    layer.product = "dense"
    dense = forward_backward(layer, x)
    layer.product = "fast"
    fast = forward_backward(layer, x)
    for name, expected in dense.items():
        assert_relative_close(fast[name], expected, TOLERANCE[dtype])


@pytest.mark.parametrize(
    "case", ["conv k1", "conv k3", "transposed k2 stride 2", "transposed k3 stride 2"]
)
def test_fast_path_under_bf16_autocast_stays_at_bf16_precision(case):
    """Besides the convolution it rounds the 8 input and 4 output combinations: within 2x the dense path's error."""
    cls, kwargs, (batch, *size) = LAYER_CASES[case]
    torch.manual_seed(0)
    layer = cls(4 * 16, 4 * 16, **kwargs).double()
    x = torch.randn(batch, 4 * 16, *size, dtype=torch.float64)
    layer.product = "dense"
    with torch.no_grad():
        reference = layer(x)
        layer.float()
        errors = {}
        for product in ("dense", "fast"):
            layer.product = product
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x.float())
            assert out.dtype == torch.bfloat16
            errors[product] = (out.double() - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()
    # bfloat16 keeps 8 significant bits: a relative rounding of up to 2**-8 per value
    assert errors["dense"] < 2**-7
    assert errors["fast"] < 2 * errors["dense"]


@pytest.mark.parametrize("cls", [QuaternionConv3d, QuaternionConvTranspose3d])
def test_product_changes_neither_parameters_nor_initialisation(cls):
    layers = {}
    for product in ("dense", "fast", "auto"):
        torch.manual_seed(5)
        layers[product] = cls(8, 12, 3, product=product)
    keys = {"r_weight", "i_weight", "j_weight", "k_weight", "bias"}
    for layer in layers.values():
        assert set(layer.state_dict()) == keys
    for name in keys:
        assert torch.equal(getattr(layers["dense"], name), getattr(layers["fast"], name))
        assert torch.equal(getattr(layers["dense"], name), getattr(layers["auto"], name))
    layers["fast"].load_state_dict(layers["dense"].state_dict())


@pytest.mark.parametrize(
    ("q_in", "q_out", "kernel", "transposed", "expected"),
    [
        (32, 32, 3, False, "fast"),
        (48, 96, 3, False, "fast"),
        (384, 192, (3, 3, 3), False, "fast"),
        (16, 16, 3, False, "dense"),  # below the width threshold
        (32, 16, 3, False, "dense"),  # both widths must reach it
        (24, 48, 3, False, "dense"),  # 24 is no multiple of 16
        (56, 56, 3, False, "dense"),
        (192, 192, 1, False, "dense"),  # a 1x1x1 grouped convolution (strided or padded) loses
        (256, 96, 2, True, "fast"),
        (96, 48, 2, True, "dense"),  # grouped transposed convolutions need wider layers
    ],
)
def test_auto_follows_the_measured_rule_on_cpu(q_in, q_out, kernel, transposed, expected):
    assert resolve_product("auto", q_in, q_out, kernel, "cpu", transposed) == expected
    assert resolve_product("auto", q_in, q_out, kernel, torch.device("cpu"), transposed) == expected
    # not measured on a GPU: dense unless forced
    assert resolve_product("auto", q_in, q_out, kernel, "cuda", transposed) == "dense"
    assert resolve_product("fast", q_in, q_out, kernel, "cuda", transposed) == "fast"
    assert resolve_product("dense", q_in, q_out, kernel, "cpu", transposed) == "dense"


@pytest.mark.parametrize(
    ("q_in", "q_out", "kernel", "transposed", "expected"),
    [
        (96, 96, 1, False, "fast"),
        (192, 192, 1, False, "fast"),
        (96, 48, 1, False, "dense"),  # both widths must reach 96
        (64, 64, 1, False, "dense"),
        (48, 24, 2, True, "fast"),  # a matrix product: no multiple of 16 needed
        (96, 48, 2, True, "fast"),
        (24, 12, 2, True, "dense"),
        (16, 16, 2, True, "dense"),
    ],
)
def test_auto_rule_for_pointwise_layers_on_cpu(q_in, q_out, kernel, transposed, expected):
    assert resolve_product("auto", q_in, q_out, kernel, "cpu", transposed, pointwise=True) == expected
    assert resolve_product("auto", q_in, q_out, kernel, "cuda", transposed, pointwise=True) == "dense"


@pytest.mark.parametrize(
    ("layer", "pointwise"),
    [
        (QuaternionConv3d(8, 8, 1), True),
        (QuaternionConv3d(8, 8, 1, stride=2), False),
        (QuaternionConv3d(8, 8, 1, padding=1), False),
        (QuaternionConv3d(8, 8, 3), False),
        (QuaternionConvTranspose3d(8, 8, 2, stride=2), True),
        (QuaternionConvTranspose3d(8, 8, (2, 2, 1), stride=(2, 2, 1)), True),
        (QuaternionConvTranspose3d(8, 8, 1), True),
        (QuaternionConvTranspose3d(8, 8, 2, stride=1), False),  # neighbouring blocks overlap
        (QuaternionConvTranspose3d(8, 8, 2, stride=2, output_padding=1), False),
        (QuaternionConvTranspose3d(8, 8, 2, stride=2, padding=1), False),
        (QuaternionConvTranspose3d(8, 8, 2, stride=2, dilation=2), False),
    ],
)
def test_pointwise_layers_are_the_ones_each_input_voxel_meets_once(layer, pointwise):
    assert layer.pointwise is pointwise


@pytest.fixture
def conv_groups(monkeypatch):
    """The ``groups`` of every ``F.conv3d`` / ``F.conv_transpose3d`` call, in order."""
    calls = []
    conv3d, conv_transpose3d = torch.nn.functional.conv3d, torch.nn.functional.conv_transpose3d

    def recording_conv3d(*args, **kwargs):
        calls.append(args[6] if len(args) > 6 else kwargs.get("groups", 1))
        return conv3d(*args, **kwargs)

    def recording_conv_transpose3d(*args, **kwargs):
        calls.append(args[6] if len(args) > 6 else kwargs.get("groups", 1))
        return conv_transpose3d(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv3d", recording_conv3d)
    monkeypatch.setattr(torch.nn.functional, "conv_transpose3d", recording_conv_transpose3d)
    return calls


def test_auto_runs_one_grouped_convolution_only_for_wide_layers_on_cpu(conv_groups):
    def run(layer):
        layer(torch.randn(1, layer.in_channels, 2, 2, 2))

    run(QuaternionConv3d(4 * 32, 4 * 48, 3, bias=False))
    run(QuaternionConv3d(4 * 24, 4 * 48, 3, bias=False))
    run(QuaternionConv3d(4 * 32, 4 * 32, 1, bias=False))
    run(QuaternionConvTranspose3d(4 * 96, 4 * 96, 3, stride=2, bias=False))
    run(QuaternionConvTranspose3d(4 * 32, 4 * 32, 3, stride=2, bias=False))
    assert conv_groups == [8, 1, 1, 8, 1]


def test_fast_pointwise_layers_run_no_convolution(conv_groups):
    """Their 8 products are one batched matrix product; a strided 1x1x1 layer keeps the grouped convolution."""
    for layer in (
        QuaternionConv3d(4 * 96, 4 * 96, 1, product="fast"),
        QuaternionConvTranspose3d(4 * 48, 4 * 24, 2, stride=2, product="auto"),
    ):
        layer(torch.randn(1, layer.in_channels, 2, 2, 2))
    assert conv_groups == []
    QuaternionConv3d(8, 8, 1, stride=2, product="fast")(torch.randn(1, 8, 2, 2, 2))
    assert conv_groups == [8]


def test_forcing_overrides_auto_and_resets_the_cached_choice(conv_groups):
    layer = QuaternionConv3d(8, 8, 3, product="fast")
    x = torch.randn(1, 8, 3, 3, 3)
    assert layer.resolved_product("cpu") == "fast"
    layer(x)
    layer.product = "dense"
    layer(x)
    assert layer.resolved_product(x.device) == "dense"
    layer.product = "auto"  # 2 quaternion channels: narrow
    layer(x)
    assert conv_groups == [8, 1, 1]
    assert "product='auto'" in repr(layer)


def test_set_quaternion_product_reaches_every_quaternion_layer():
    block = nn.Sequential(
        QuaternionConv3d(8, 8, 3),
        nn.Sequential(nn.Conv3d(8, 8, 1), QuaternionConvTranspose3d(8, 4, 2, stride=2)),
    )
    assert set_quaternion_product(block, "fast") is block
    assert [m.product for m in (block[0], block[1][1])] == ["fast", "fast"]
    set_quaternion_product(block, "dense")
    assert [m.resolved_product("cpu") for m in (block[0], block[1][1])] == ["dense", "dense"]


@pytest.mark.parametrize("bad", ["Fast", "sparse", "", None])
def test_bad_product_raises_one_line_error(bad):
    with pytest.raises(AqcfError, match="product") as error:
        QuaternionConv3d(8, 8, 3, product=bad)
    assert "\n" not in str(error.value)
    with pytest.raises(AqcfError, match="expected one of"):
        QuaternionConvTranspose3d(8, 8, 2, product=bad)
    with pytest.raises(AqcfError):
        set_quaternion_product(nn.Sequential(QuaternionConv3d(8, 8, 1)), bad)
    layer = QuaternionConv3d(8, 8, 1)
    with pytest.raises(AqcfError):
        layer.product = bad
    assert layer.product == "auto"
