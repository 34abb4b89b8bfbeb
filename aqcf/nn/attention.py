"""Additive attention gate on a decoder skip (Oktay et al. 2018), with quaternion projections.

Written by hand because MONAI's ``AttentionBlock`` is real-valued and batch-normed. The gate computes
``α = σ(ψ(ReLU(W_x x + W_g g)))`` and returns ``α · x``. ``W_x`` and ``W_g`` are 1×1×1 quaternion
convolutions; ``ψ`` is a *real* 1×1×1 convolution to one channel, because the gate is one real
coefficient per voxel: scaling the four components of every skip quaternion by the same real ``α``
attenuates it without rotating it, and keeps the skip a valid quaternion tensor. A quaternion ``ψ``
would need four output channels (one quaternion) and a product that mixes components.

Normalisation layers of MONAI's variant are left out: instance norm on the one-channel ``ψ`` output
would force every map to zero mean, and Oktay et al.'s formulation has none.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aqcf.errors import AqcfError
from aqcf.nn.blocks import QUATERNION, check_algebra, make_conv

__all__ = ["QuaternionAttentionGate"]

_ATTENTION_CHANNELS = 1


class QuaternionAttentionGate(nn.Module):
    """Attention-gated skip connection.

    Args:
        skip_channels: real channels of the skip features ``x``.
        gating_channels: real channels of the gating signal ``g`` (the upsampled deeper features).
        inter_channels: real channels of the joint space; a multiple of 4 for quaternion layers.
        algebra: ``"quaternion"`` or ``"real"`` (``W_x``, ``W_g``; ``ψ`` is real in both).

    Shapes:
        ``x``: ``(B, skip_channels, X, Y, Z)``, ``g``: ``(B, gating_channels, X, Y, Z)`` (same grid)
        -> ``(B, skip_channels, X, Y, Z)``.
    """

    def __init__(
        self, skip_channels: int, gating_channels: int, inter_channels: int, algebra: str = QUATERNION
    ) -> None:
        super().__init__()
        check_algebra(algebra)
        # a single bias in the joint space suffices (Oktay et al.: b_g only)
        self.w_x = make_conv(algebra, skip_channels, inter_channels, 1, bias=False)
        self.w_g = make_conv(algebra, gating_channels, inter_channels, 1, bias=True)
        self.psi = nn.Conv3d(inter_channels, _ATTENTION_CHANNELS, 1)

    def attention(self, x: Tensor, g: Tensor) -> Tensor:
        """The attention map ``α`` in ``[0, 1]``, shape ``(B, 1, X, Y, Z)``."""
        if x.shape[2:] != g.shape[2:]:
            raise AqcfError(
                f"attention gate: skip grid {tuple(x.shape[2:])} and gating grid {tuple(g.shape[2:])} differ"
            )
        return torch.sigmoid(self.psi(torch.relu(self.w_x(x) + self.w_g(g))))

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        return self.attention(x, g) * x
