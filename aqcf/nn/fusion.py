"""The Adaptive Quaternion Cross-Fusion (A-QCF) block: Algorithm 1 of the paper, eqs. 4-9.

Written by hand (no library has it). :class:`CrossModalTransfer` is one direction (the paper's
``ComputeContext`` + ``ComputeGate`` + line 19); :class:`AQCFBlock` holds every direction between
its streams (for the default pair MRI→CT and CT→MRI), with separate weights (default) or one set
called for every direction (as Algorithm 1 writes it), and applies them to the *original* features
of every stream (lines 17-23). With more than two streams a target receives the sum of the gated
contexts from all other streams: ``F'_t = QConv_out(concat[F_t, Σ_{s≠t} λ_{s→t} C_raw(s→t)])``
(docs/model.md, "N streams").

Within one block, a zero source stream gives ``K = V = 0`` (bias-free projections), so ``C_raw = 0``
and the target update is ``QConv_out(concat[F, 0])`` (eq. 10). In the network the absent stream is
not zero after its first norm layer (see docs/model.md §3); ``context_off=True`` applies eq. 10 as
written, whatever the source holds.
"""

from __future__ import annotations

import keyword
from collections.abc import Collection, Sequence

import torch
from torch import Tensor, nn

from aqcf.constants import MODALITIES
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
    "check_modalities",
    "direction_name",
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


def check_modalities(modalities: Sequence[str], minimum: int = 1) -> tuple[str, ...]:
    """Return ``modalities`` as a tuple if they are at least ``minimum`` unique lowercase identifiers.

    Raises :class:`AqcfError` otherwise, and for names that are attributes of ``nn.ModuleDict``
    (``"keys"``, ``"update"``, ...), which cannot key its submodules.
    """
    if isinstance(modalities, str) or not isinstance(modalities, Sequence):
        raise AqcfError(f"modalities={modalities!r}: expected a sequence of names, e.g. ('ct', 'mri')")
    names = tuple(modalities)
    bad = [
        m for m in names
        if not isinstance(m, str) or not m.isidentifier() or m != m.lower() or keyword.iskeyword(m)
        or hasattr(nn.ModuleDict(), m)
    ]
    if bad:
        raise AqcfError(f"modalities={names!r}: {bad[0]!r} is not a lowercase identifier usable as a module name")
    if len(set(names)) != len(names):
        raise AqcfError(f"modalities={names!r}: names must be unique")
    if len(names) < minimum:
        raise AqcfError(f"modalities={names!r}: expected at least {minimum} streams")
    return names


def direction_name(source: str, target: str) -> str:
    """The name of the A-QCF direction from ``source`` into ``target``, e.g. ``"mri_to_ct"``."""
    return f"{source}_to_{target}"


class CrossModalTransfer(nn.Module):
    """One direction of the A-QCF block: knowledge from a source stream into a target stream.

    Args:
        channels: real channels ``4C`` of both streams at this scale.
        gate: ``"adaptive"`` (λ from the gate MLP, eq. 8) or ``"static"`` (λ ≡ 1, Table 7 ablation).
        algebra: ``"quaternion"`` or ``"real"``.
        gate_reduction: the gate MLP's hidden width is ``max(1, 2 * channels // gate_reduction)``.
        negative_slope: LeakyReLU slope in ``QConv_out``.
        out_kernel: kernel size of ``QConv_out`` (3 or 1; the paper does not give it).
        with_out: build ``QConv_out``. With more than two streams a target's contexts from several
            sources are summed and share the target's one ``QConv_out``, held by the direction from its
            first source; the other directions into that target are built without one and only give
            their gated context (:meth:`gated_context`).

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
        with_out: bool = True,
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
        self.qconv_out = (
            ConvNormAct(2 * channels, channels, out_kernel, algebra=algebra, negative_slope=negative_slope)
            if with_out
            else None
        )
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

    def gated_context(
        self, f_target: Tensor, f_source: Tensor, context_off: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Algorithm 1 lines 3-15 for one direction: the gated context ``λ · C_raw`` and ``λ``.

        Sets ``last_context_rms``.

        Args:
            f_target: features of the stream being updated, ``(B, 4C, D, H, W)``.
            f_source: features of the source stream, same shape.
            context_off: the source is an absent modality: ``λ = 0`` and ``C_raw = 0`` (eq. 10);
                ``f_source`` is not read.

        Returns:
            ``(λ · C_raw, λ)``: ``(B, 4C, D, H, W)`` and ``(B, 1, 1, 1, 1)``.
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
        gated = gate * context
        self.last_context_rms = gated.detach().pow(2).mean(dim=(1, *_SPATIAL)).sqrt()
        return gated, gate

    def update(self, f_target: Tensor, context: Tensor) -> Tensor:
        """Algorithm 1 line 19 (eq. 9): ``F' = QConv_out(concat[F, context])``.

        Args:
            f_target: features of the stream being updated, ``(B, 4C, D, H, W)``.
            context: the gated context it receives (summed over its sources), same shape.
        """
        if self.qconv_out is None:
            raise AqcfError("this A-QCF direction has no QConv_out: its target's update is held by another direction")
        # concatenate per quaternion component ([r_F, r_C, i_F, i_C, ...]) so that the 8C channels
        # are again a valid quaternion tensor for QConv_out
        return self.qconv_out(quaternion_cat([f_target, context]))

    def forward(
        self, f_target: Tensor, f_source: Tensor, context_off: bool = False, extra_context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Algorithm 1 lines 17-19 (eq. 9) for one direction.

        Args:
            f_target: features of the stream being updated, ``(B, 4C, D, H, W)``.
            f_source: features of the other stream, same shape.
            context_off: the source is an absent modality: ``λ = 0`` and ``C_raw = 0``, so the update
                is ``QConv_out(concat[F, 0])`` exactly (eq. 10); ``f_source`` is not read.
            extra_context: with more than two streams, the summed gated contexts from the target's
                other sources, added to this direction's before ``QConv_out``; ``None`` for two.

        Returns:
            ``(F'_target, λ)``: ``(B, 4C, D, H, W)`` and ``(B, 1, 1, 1, 1)``.
        """
        gated, gate = self.gated_context(f_target, f_source, context_off)
        context = gated if extra_context is None else gated + extra_context
        return self.update(f_target, context), gate


class AQCFBlock(nn.Module):
    """A-QCF block (Algorithm 1) between M >= 2 streams: every stream receives context from every other.

    For the default pair the directions are MRI→CT and CT→MRI. A target ``t`` is updated once, from
    the sum of the gated contexts of all its sources:
    ``F'_t = QConv_out_t(concat[F_t, Σ_{s≠t} λ_{s→t} C_raw(s→t)])``; for two streams this is
    Algorithm 1 line 19 as written.

    Args:
        channels: real channels ``4C`` of each stream at this scale.
        gate: ``"adaptive"`` or ``"static"`` (λ ≡ 1).
        algebra: ``"quaternion"`` or ``"real"``.
        gate_reduction: reduction of the gate MLP's hidden width.
        negative_slope: LeakyReLU slope.
        out_kernel: kernel size of ``QConv_out`` (3 or 1).
        weights: ``"separate"`` (one submodule per direction, named ``"{source}_to_{target}"``: its own
            ``QConv_q/k/v`` and gate MLP; the ``QConv_out`` of target ``t`` sits in the direction from
            ``t``'s first source in ``modalities`` order) or ``"shared"`` (one submodule ``transfer``
            called for every direction and target, as Algorithm 1 writes it).
        modalities: the stream names, in the order of :meth:`forward`'s arguments.

    Attributes:
        directions: ``(source, target)`` pairs, by target then source in ``modalities`` order
            (``(("mri", "ct"), ("ct", "mri"))`` for the default pair).
        last_context_rms: after each forward, ``{"{source}_to_{target}": (B,)}``, the RMS of the gated
            context of each direction.
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
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        super().__init__()
        if weights not in FUSION_WEIGHTS:
            raise AqcfError(f"fusion_weights={weights!r}: expected one of {FUSION_WEIGHTS}")
        self.weights = weights
        self.modalities = check_modalities(modalities, minimum=2)
        self.directions = tuple((s, t) for t in self.modalities for s in self.modalities if s != t)
        names = [direction_name(s, t) for s, t in self.directions]
        if len(set(names)) != len(names):
            raise AqcfError(f"modalities={self.modalities!r}: direction names {names} are not unique")
        args = (channels, gate, algebra, gate_reduction, negative_slope, out_kernel)
        if weights == SEPARATE_WEIGHTS:
            # built in direction order, so that the default pair registers (and initialises) mri_to_ct
            # then ct_to_mri, as the two-stream block always did
            for s, t in self.directions:
                self.add_module(direction_name(s, t), CrossModalTransfer(*args, with_out=s == self._sources(t)[0]))
        else:
            self.transfer = CrossModalTransfer(*args)
        self.last_context_rms: dict[str, Tensor] = {}

    def _sources(self, target: str) -> tuple[str, ...]:
        return tuple(s for s in self.modalities if s != target)

    def direction(self, name: str) -> CrossModalTransfer:
        """The module of direction ``"{source}_to_{target}"`` (the same one for all when shared)."""
        names = [direction_name(s, t) for s, t in self.directions]
        if name not in names:
            raise AqcfError(f"A-QCF direction {name!r}: expected one of {names}")
        return self.transfer if self.weights == SHARED_WEIGHTS else getattr(self, name)

    def output(self, target: str) -> CrossModalTransfer:
        """The module whose ``QConv_out`` updates ``target`` (the direction from its first source)."""
        return self.direction(direction_name(self._sources(target)[0], target))

    def forward(self, *features: Tensor, absent: str | Collection[str] | None = None) -> tuple[Tensor, ...]:
        """Update every stream from all the others.

        Args:
            *features: one tensor ``(B, 4C, D, H, W)`` per stream in ``modalities`` order (for the
                default pair ``f_ct, f_mri``; other patients: only shapes correspond).
            absent: a modality or modalities whose context into every other stream is switched off
                (``λ = 0``, eq. 10); ``None`` runs every direction as in training.

        Returns:
            the updated features in ``modalities`` order, then ``λ`` per direction of :attr:`directions`,
            each ``(B, 1, 1, 1, 1)``: ``(F'_ct, F'_mri, λ_mri→ct, λ_ct→mri)`` for the default pair.
        """
        if len(features) != len(self.modalities):
            raise AqcfError(
                f"A-QCF block over {self.modalities}: got {len(features)} feature tensors, one per stream expected"
            )
        off = {absent} if isinstance(absent, str) else set(absent or ())
        inputs = dict(zip(self.modalities, features, strict=True))
        gates: dict[str, Tensor] = {}
        context_rms: dict[str, Tensor] = {}
        updated: dict[str, Tensor] = {}
        for t in self.modalities:
            first, *others = self._sources(t)
            # the gated contexts from all but the first source, summed ...
            extra = None
            for s in others:
                name = direction_name(s, t)
                transfer = self.direction(name)
                gated, gates[name] = transfer.gated_context(inputs[t], inputs[s], context_off=s in off)
                context_rms[name] = transfer.last_context_rms
                extra = gated if extra is None else extra + gated
            # ... join the first source's in the direction that holds t's QConv_out; for two streams
            # there are none, and this is the two-stream block's call exactly
            name = direction_name(first, t)
            transfer = self.direction(name)
            updated[t], gates[name] = transfer(inputs[t], inputs[first], context_off=first in off, extra_context=extra)
            context_rms[name] = transfer.last_context_rms
        self.last_context_rms = {direction_name(s, t): context_rms[direction_name(s, t)] for s, t in self.directions}
        return (*(updated[m] for m in self.modalities), *(gates[direction_name(s, t)] for s, t in self.directions))
