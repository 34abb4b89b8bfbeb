"""The Adaptive Quaternion Cross-Fusion (A-QCF) block: Algorithm 1 of the paper, eqs. 4-9.

Written by hand (no library has it). :class:`CrossModalTransfer` is one direction (the paper's
``ComputeContext`` + ``ComputeGate`` + line 19); :class:`AQCFBlock` holds both directions,
MRI→CT and CT→MRI, with separate weights (default) or one set called for both directions (as
Algorithm 1 writes it), and applies them to the *original* features of both streams (lines 17-23).

Within one block, a zero source stream gives ``K = V = 0`` (bias-free projections), so ``C_raw = 0``
and the target update is ``QConv_out(concat[F, 0])`` (eq. 10). In the network the absent stream is
not zero after its first norm layer (see docs/model.md §3); ``context_off=True`` applies eq. 10 as
written, whatever the source holds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aqcf.constants import CT, MRI
from aqcf.errors import AqcfError
from aqcf.nn.blocks import DEFAULT_NEGATIVE_SLOPE, QUATERNION, ConvNormAct, check_algebra, make_conv
from aqcf.nn.quaternion import check_quaternion_channels, quaternion_cat

__all__ = [
    "ADAPTIVE",
    "STATIC",
    "GATES",
    "DEFAULT_GATE_REDUCTION",
    "FUSION_WEIGHTS",
    "SEPARATE_WEIGHTS",
    "SHARED_WEIGHTS",
    "check_gate",
    "CrossModalTransfer",
    "AQCFBlock",
]

ADAPTIVE = "adaptive"
STATIC = "static"
GATES = (ADAPTIVE, STATIC)
# hidden width of the gate MLP = 2 * channels / reduction (the squeeze-and-excitation ratio)
DEFAULT_GATE_REDUCTION = 16
SEPARATE_WEIGHTS = "separate"
SHARED_WEIGHTS = "shared"
FUSION_WEIGHTS = (SEPARATE_WEIGHTS, SHARED_WEIGHTS)
OUT_KERNELS = (1, 3)
_SPATIAL = (2, 3, 4)
_CHANNEL_AXIS = 1


def check_gate(gate: str) -> str:
    """Return ``gate`` if it is ``"adaptive"`` or ``"static"``, else raise :class:`AqcfError`."""
    if gate not in GATES:
        raise AqcfError(f"gate={gate!r}: expected one of {GATES}")
    return gate


class CrossModalTransfer(nn.Module):
    """One direction of the A-QCF block: knowledge from a source stream into a target stream.

    Args:
        channels: real channels ``4C`` of both streams at this scale.
        gate: ``"adaptive"`` (λ from the gate MLP, eq. 8) or ``"static"`` (λ ≡ 1, Table 7 ablation).
        algebra: ``"quaternion"`` or ``"real"``.
        gate_reduction: the gate MLP's hidden width is ``max(1, 2 * channels // gate_reduction)``.
        negative_slope: LeakyReLU slope in ``QConv_out``.
        out_kernel: kernel size of ``QConv_out`` (3 or 1; the paper does not give it).

    Attributes:
        last_context_rms: after each forward, the RMS over channels and voxels of the gated context
            ``λ · C_raw`` that entered the target stream, detached, shape ``(B,)``.
    """

    def __init__(
        self,
        channels: int,
        gate: str = ADAPTIVE,
        algebra: str = QUATERNION,
        gate_reduction: int = DEFAULT_GATE_REDUCTION,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
        out_kernel: int = 3,
    ) -> None:
        super().__init__()
        check_quaternion_channels(channels, "A-QCF channels")
        if out_kernel not in OUT_KERNELS:
            raise AqcfError(f"fusion_out_kernel={out_kernel!r}: expected one of {OUT_KERNELS}")
        self.gate_mode = check_gate(gate)
        check_algebra(algebra)
        # bias-free, so that a zero source gives K = V = 0 exactly (eq. 10)
        self.qconv_q = make_conv(algebra, channels, channels, 1, bias=False)
        self.qconv_k = make_conv(algebra, channels, channels, 1, bias=False)
        self.qconv_v = make_conv(algebra, channels, channels, 1, bias=False)
        if self.gate_mode == ADAPTIVE:
            hidden = max(1, 2 * channels // gate_reduction)
            self.mlp = nn.Sequential(nn.Linear(2 * channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        else:
            self.mlp = None
        # QConv_out: a quaternion conv block from concat[F, λ C_raw] (8C real) back to 4C
        self.qconv_out = ConvNormAct(2 * channels, channels, out_kernel, algebra=algebra, negative_slope=negative_slope)
        self.last_context_rms: Tensor | None = None

    def compute_context(self, f_query: Tensor, f_key_val: Tensor) -> Tensor:
        """Algorithm 1 lines 3-9 (eqs. 4-6): ``C_raw = softmax(Q ⊙ K, channel) ⊙ V``.

        Args:
            f_query: target-stream features ``(B, 4C, D, H, W)``.
            f_key_val: source-stream features ``(B, 4C, D, H, W)``.

        Returns:
            ``C_raw``, ``(B, 4C, D, H, W)``.
        """
        q = self.qconv_q(f_query)
        k = self.qconv_k(f_key_val)
        v = self.qconv_v(f_key_val)
        attention = torch.softmax(q * k, dim=_CHANNEL_AXIS)
        context = attention * v
        return context

    def compute_gate(self, f_original: Tensor, context: Tensor) -> Tensor:
        """Algorithm 1 lines 10-15 (eqs. 7-8): ``λ = σ(MLP(concat[GAP(F), GAP(C_raw)]))``.

        Returns:
            λ in ``[0, 1]``, shape ``(B, 1, 1, 1, 1)``; exactly 1 for ``gate="static"``.
        """
        batch = f_original.shape[0]
        if self.mlp is None:
            return torch.ones(batch, 1, 1, 1, 1, dtype=f_original.dtype, device=f_original.device)
        s_orig = f_original.mean(dim=_SPATIAL)
        s_ctx = context.mean(dim=_SPATIAL)
        s_comb = torch.cat([s_orig, s_ctx], dim=_CHANNEL_AXIS)
        gate = torch.sigmoid(self.mlp(s_comb))
        return gate.view(batch, 1, 1, 1, 1)

    def forward(self, f_target: Tensor, f_source: Tensor, context_off: bool = False) -> tuple[Tensor, Tensor]:
        """Algorithm 1 lines 17-19 (eq. 9) for one direction.

        Args:
            f_target: features of the stream being updated, ``(B, 4C, D, H, W)``.
            f_source: features of the other stream, same shape.
            context_off: the source is an absent modality: ``λ = 0`` and ``C_raw = 0``, so the update
                is ``QConv_out(concat[F, 0])`` exactly (eq. 10); ``f_source`` is not read.

        Returns:
            ``(F'_target, λ)``: ``(B, 4C, D, H, W)`` and ``(B, 1, 1, 1, 1)``.
        """
        if f_target.shape != f_source.shape:
            raise AqcfError(
                f"A-QCF block: target features {tuple(f_target.shape)} and source features "
                f"{tuple(f_source.shape)} differ in shape"
            )
        if context_off:
            context = torch.zeros_like(f_target)
            gate = torch.zeros(f_target.shape[0], 1, 1, 1, 1, dtype=f_target.dtype, device=f_target.device)
        else:
            context = self.compute_context(f_target, f_source)
            gate = self.compute_gate(f_target, context)
        self.last_context_rms = (gate * context).detach().pow(2).mean(dim=(1, *_SPATIAL)).sqrt()
        # concatenate per quaternion component ([r_F, r_C, i_F, i_C, ...]) so that the 8C channels
        # are again a valid quaternion tensor for QConv_out
        fused = quaternion_cat([f_target, gate * context])
        return self.qconv_out(fused), gate


class AQCFBlock(nn.Module):
    """Bidirectional A-QCF block (Algorithm 1): MRI→CT and CT→MRI.

    Args:
        channels: real channels ``4C`` of each stream at this scale.
        gate: ``"adaptive"`` or ``"static"`` (λ ≡ 1).
        algebra: ``"quaternion"`` or ``"real"``.
        gate_reduction: reduction of the gate MLP's hidden width.
        negative_slope: LeakyReLU slope.
        out_kernel: kernel size of ``QConv_out`` (3 or 1).
        weights: ``"separate"`` (submodules ``mri_to_ct`` and ``ct_to_mri``) or ``"shared"`` (one
            submodule ``transfer`` called for both directions, as Algorithm 1 writes it).
    """

    def __init__(
        self,
        channels: int,
        gate: str = ADAPTIVE,
        algebra: str = QUATERNION,
        gate_reduction: int = DEFAULT_GATE_REDUCTION,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
        out_kernel: int = 3,
        weights: str = SEPARATE_WEIGHTS,
    ) -> None:
        super().__init__()
        if weights not in FUSION_WEIGHTS:
            raise AqcfError(f"fusion_weights={weights!r}: expected one of {FUSION_WEIGHTS}")
        self.weights = weights
        args = (channels, gate, algebra, gate_reduction, negative_slope, out_kernel)
        if weights == SEPARATE_WEIGHTS:
            self.mri_to_ct = CrossModalTransfer(*args)
            self.ct_to_mri = CrossModalTransfer(*args)
        else:
            self.transfer = CrossModalTransfer(*args)
        self.last_context_rms: dict[str, Tensor] = {}

    def direction(self, name: str) -> CrossModalTransfer:
        """The module of direction ``"mri_to_ct"`` or ``"ct_to_mri"`` (the same one when shared)."""
        return self.transfer if self.weights == SHARED_WEIGHTS else getattr(self, name)

    def forward(
        self, f_ct: Tensor, f_mri: Tensor, absent: str | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Update both streams from the other one.

        Args:
            f_ct: CT features ``(B, 4C, D, H, W)``.
            f_mri: MRI features, same shape (another patient: only shapes correspond).
            absent: ``"ct"`` or ``"mri"`` to switch off the context from that (absent) stream into
                the other one (``λ = 0``, eq. 10); ``None`` runs both directions as in training.

        Returns:
            ``(F'_ct, F'_mri, λ_mri→ct, λ_ct→mri)``; features as the inputs, gates ``(B, 1, 1, 1, 1)``.
            ``last_context_rms`` then holds ``{"mri_to_ct": (B,), "ct_to_mri": (B,)}``.
        """
        mri_to_ct, ct_to_mri = self.direction("mri_to_ct"), self.direction("ct_to_mri")
        f_ct_new, gate_mri_to_ct = mri_to_ct(f_ct, f_mri, context_off=absent == MRI)
        rms_mri_to_ct = mri_to_ct.last_context_rms
        f_mri_new, gate_ct_to_mri = ct_to_mri(f_mri, f_ct, context_off=absent == CT)
        self.last_context_rms = {"mri_to_ct": rms_mri_to_ct, "ct_to_mri": ct_to_mri.last_context_rms}
        return f_ct_new, f_mri_new, gate_mri_to_ct, gate_ct_to_mri
