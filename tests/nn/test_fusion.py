"""The A-QCF block (Algorithm 1): eq. 10 collapse, the gate's range, the channel softmax, both directions."""

from __future__ import annotations

import pytest
import torch

from aqcf.nn.fusion import AQCFBlock, CrossModalTransfer

CHANNELS = 8  # two quaternion channels


def features(batch=2, channels=CHANNELS, size=(6, 5, 4)):
    return torch.randn(batch, channels, *size)


def per_component_concat(a, b):
    """[r_a, r_b, i_a, i_b, j_a, j_b, k_a, k_b], written out for two tensors of equal width."""
    c = a.shape[1] // 4
    parts = []
    for n in range(4):
        parts += [a[:, n * c : (n + 1) * c], b[:, n * c : (n + 1) * c]]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("algebra", ["quaternion", "real"])
def test_zero_source_collapses_to_the_residual_path(algebra):
    """Eq. 10: F_mri ≡ 0 gives K = V = 0, C_raw = 0 and F'_ct = QConv_out(concat[F_ct, 0])."""
    block = AQCFBlock(CHANNELS, algebra=algebra).eval()
    f_ct = features()
    zero = torch.zeros_like(f_ct)
    transfer = block.mri_to_ct
    assert torch.count_nonzero(transfer.qconv_k(zero)) == 0
    assert torch.count_nonzero(transfer.qconv_v(zero)) == 0
    assert torch.count_nonzero(transfer.compute_context(f_ct, zero)) == 0
    f_ct_new, _, _, _ = block(f_ct, zero)
    expected = transfer.qconv_out(per_component_concat(f_ct, zero))
    torch.testing.assert_close(f_ct_new, expected, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_adaptive_gate_is_one_scalar_per_sample_in_unit_interval(batch):
    block = AQCFBlock(CHANNELS)
    f_ct, f_mri = features(batch) * 5, features(batch) * 5
    _, _, g1, g2 = block(f_ct, f_mri)
    for gate in (g1, g2):
        assert gate.shape == (batch, 1, 1, 1, 1)
        assert bool(((gate >= 0) & (gate <= 1)).all())
    # an extreme gate MLP saturates but stays in [0, 1]
    with torch.no_grad():
        block.mri_to_ct.mlp[-1].bias.fill_(1e4)
    assert torch.equal(block(f_ct, f_mri)[2], torch.ones(batch, 1, 1, 1, 1))


def test_static_gate_is_exactly_one_and_has_no_mlp():
    block = AQCFBlock(CHANNELS, gate="static")
    _, _, g1, g2 = block(features(3), features(3))
    assert torch.equal(g1, torch.ones(3, 1, 1, 1, 1))
    assert torch.equal(g2, torch.ones(3, 1, 1, 1, 1))
    adaptive = AQCFBlock(CHANNELS)
    assert sum(p.numel() for p in block.parameters()) < sum(p.numel() for p in adaptive.parameters())


def test_gate_scales_the_context_fed_to_qconv_out():
    """F' = QConv_out(concat[F, λ C_raw]) with the λ the block reports."""
    block = AQCFBlock(CHANNELS).eval()
    f_ct, f_mri = features(), features()
    f_ct_new, _, gate, _ = block(f_ct, f_mri)
    transfer = block.mri_to_ct
    context = transfer.compute_context(f_ct, f_mri)
    expected = transfer.qconv_out(per_component_concat(f_ct, gate * context))
    torch.testing.assert_close(f_ct_new, expected)


def test_context_is_channel_softmax_of_q_times_k_times_v():
    """With identity projections, C_raw = softmax_c(F_t ⊙ F_s) ⊙ F_s, the softmax over all 4C channels."""
    transfer = CrossModalTransfer(CHANNELS)
    with torch.no_grad():
        for conv in (transfer.qconv_q, transfer.qconv_k, transfer.qconv_v):
            conv.r_weight.copy_(torch.eye(CHANNELS // 4).view(CHANNELS // 4, CHANNELS // 4, 1, 1, 1))
            for name in ("i_weight", "j_weight", "k_weight"):
                getattr(conv, name).zero_()
    f_t, f_s = features(1), features(1)
    logits = f_t * f_s
    expected = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True) * f_s
    torch.testing.assert_close(transfer.compute_context(f_t, f_s), expected)


def test_directions_have_separate_weights_and_use_original_features():
    block = AQCFBlock(CHANNELS).eval()
    ids_a = {id(p) for p in block.mri_to_ct.parameters()}
    ids_b = {id(p) for p in block.ct_to_mri.parameters()}
    assert not ids_a & ids_b
    f_ct, f_mri = features(), features()
    _, f_mri_new, _, g2 = block(f_ct, f_mri)
    # CT→MRI reads the *input* CT features, not the updated ones (Algorithm 1 line 21)
    expected, expected_gate = block.ct_to_mri(f_mri, f_ct)
    torch.testing.assert_close(f_mri_new, expected)
    torch.testing.assert_close(g2, expected_gate)


def test_source_stream_reaches_the_target_output():
    block = AQCFBlock(CHANNELS)
    f_ct = features()
    f_mri = features().requires_grad_(True)
    f_ct_new, _, _, _ = block(f_ct, f_mri)
    f_ct_new.square().sum().backward()
    assert f_mri.grad.abs().sum() > 0


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="gate"):
        AQCFBlock(CHANNELS, gate="dynamic")
    with pytest.raises(ValueError, match="algebra"):
        AQCFBlock(CHANNELS, algebra="complex")
    with pytest.raises(ValueError, match="multiple of 4"):
        AQCFBlock(6)
    with pytest.raises(ValueError, match="differ in shape"):
        AQCFBlock(CHANNELS)(features(2), features(3))


def test_context_off_ignores_the_source_and_gives_qconv_out_of_features_and_zeros():
    block = AQCFBlock(CHANNELS).eval()
    f_ct, f_mri = features(), features() * 3  # a non-zero "absent" stream
    with torch.no_grad():
        f_ct_new, f_mri_new, gate_mri_to_ct, gate_ct_to_mri = block(f_ct, f_mri, absent="mri")
        expected = block.mri_to_ct.qconv_out(per_component_concat(f_ct, torch.zeros_like(f_ct)))
        torch.testing.assert_close(f_ct_new, expected, rtol=0, atol=0)
        assert torch.equal(gate_mri_to_ct, torch.zeros(2, 1, 1, 1, 1))
        assert torch.equal(block.last_context_rms["mri_to_ct"], torch.zeros(2))
        # the other direction is untouched
        torch.testing.assert_close(f_mri_new, block.ct_to_mri(f_mri, f_ct)[0], rtol=0, atol=0)
        assert bool((block.last_context_rms["ct_to_mri"] > 0).all())


def test_shared_weights_hold_one_direction_and_out_kernel_one_is_pointwise():
    separate = AQCFBlock(CHANNELS)
    shared = AQCFBlock(CHANNELS, weights="shared", out_kernel=1)
    n_separate = sum(p.numel() for p in separate.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    # QConv_out 8C -> 4C real channels: 4·(2c)·c·k³ weights with c = 2 quaternion channels, k = 3 vs 1
    assert n_separate // 2 - n_shared == 4 * 4 * 2 * (27 - 1)
    assert shared.direction("mri_to_ct") is shared.direction("ct_to_mri")
    assert tuple(shared.transfer.qconv_out[0].kernel_size) == (1, 1, 1)
