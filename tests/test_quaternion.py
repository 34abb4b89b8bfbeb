"""Quaternion layers against products built from the textbook unit table (i² = j² = k² = ijk = -1)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from aqcf.nn.quaternion import (
    QuaternionConv3d,
    QuaternionConvTranspose3d,
    hamilton_product,
    quaternion_cat,
)

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


def test_conv_1x1x1_is_left_hamilton_product_per_voxel():
    layer = QuaternionConv3d(4 * 2, 4 * 3, kernel_size=1)
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
    out = [torch.zeros(x.shape[0], q_out, *size) for _ in range(4)]
    for dx, dy, dz in itertools.product(range(3), repeat=3):
        shifted = [c[:, :, dx : dx + size[0], dy : dy + size[1], dz : dz + size[2]] for c in xc]
        for (a, b), (sign, c) in UNIT_TABLE.items():
            out[c] += sign * torch.einsum("oi,bixyz->boxyz", w[a][:, :, dx, dy, dz], shifted[b])
    return torch.cat(out, dim=1)


def test_conv_3x3x3_sums_hamilton_products_over_offsets():
    layer = QuaternionConv3d(4 * 2, 4 * 3, kernel_size=3, bias=False)
    x = torch.randn(2, 4 * 2, 5, 4, 6)
    expected = expected_conv3x3x3(components(layer), x, 3)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_strided_conv_subsamples_the_same_products():
    layer = QuaternionConv3d(4, 8, kernel_size=3, stride=2, bias=False)
    x = torch.randn(1, 4, 8, 6, 4)
    expected = expected_conv3x3x3(components(layer), x, 2)[:, :, ::2, ::2, ::2]
    out = layer(x)
    assert out.shape == (1, 8, 4, 3, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_transposed_conv_scatters_w_times_x():
    layer = QuaternionConvTranspose3d(4 * 2, 4 * 3, kernel_size=2, stride=2)
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


def test_transposed_conv_is_not_the_conjugate_product():
    layer = QuaternionConvTranspose3d(4, 4, kernel_size=1, stride=1, bias=False)
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
