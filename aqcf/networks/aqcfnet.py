"""A-QCF-Net (paper section 3.2, Fig. 2): a dual-stream quaternion U-Net for unpaired CT and MRI.

Per stream: a real stem conv (1 → 4·w0 channels) and a quaternion conv at full resolution, four
quaternion encoder stages (each halves the grid with a strided 3×3×3 QConv), an A-QCF block after
each stage exchanging information with the other stream, a shared quaternion bottleneck (one set of
weights applied to each stream separately), and a decoder of transposed-QConv upsampling with
attention-gated skips, ending in a 1×1×1 real conv to ``num_classes`` logits.

Widths count quaternion channels (a tensor with width ``w`` has ``4w`` real channels).

The streams are named by ``modalities`` (default ``("ct", "mri")``, the paper's network). Any
``M >= 1`` names build the same network with one stem, encoder, decoder and head per stream and an
A-QCF block per stage in which every stream receives the summed gated contexts of all the others
(the paper's future work; docs/model.md, "N streams"); ``M = 1`` is a single-stream U-Net.

The paper leaves the convolutions per stage, the kernel of ``QConv_out`` and whether the two A-QCF
directions share weights open; :data:`READINGS` names the readings of section 3.2.3: the default
(``"paper-shared"``), the network as first built (``"current"``) and ``"paper-out1"``, see
docs/model.md §6.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from aqcf.constants import MODALITIES
from aqcf.errors import AqcfError
from aqcf.nn.attention import QuaternionAttentionGate
from aqcf.nn.blocks import (
    DEFAULT_NEGATIVE_SLOPE,
    QUATERNION,
    REAL,
    ConvNormAct,
    check_algebra,
    make_conv_transpose,
)
from aqcf.nn.fusion import (
    ADAPTIVE,
    DEFAULT_GATE_REDUCTION,
    SEPARATE_WEIGHTS,
    SHARED_WEIGHTS,
    AQCFBlock,
    check_gate,
    check_modalities,
    direction_name,
)
from aqcf.nn.quaternion import AUTO, QUATERNION_COMPONENTS, quaternion_cat, set_quaternion_product

__all__ = [
    "PAPER_WIDTHS",
    "PAPER_PARAMETERS",
    "SHARED",
    "SEPARATE",
    "BOTTLENECKS",
    "ZERO_FILLED",
    "CONTEXT_OFF",
    "ABSENT_CONTEXTS",
    "READINGS",
    "DEFAULT_READING",
    "FIRST_READING",
    "complete_network_config",
    "AQCFNet",
    "EncoderStage",
    "DecoderStage",
    "Decoder",
    "count_parameters",
]

PAPER_WIDTHS = (12, 24, 48, 96, 192, 256)
PAPER_PARAMETERS = 31.5e6  # section 4.1.4
SHARED = "shared"
SEPARATE = "separate"
BOTTLENECKS = (SHARED, SEPARATE)
ZERO_FILLED = "zero-filled"  # eq. 17: the absent stream runs on zeros, every gate as trained
CONTEXT_OFF = "off"  # eq. 10 at every stage: λ = 0 for the context from the absent stream
ABSENT_CONTEXTS = (ZERO_FILLED, CONTEXT_OFF)
DEFAULT_READING = "paper-shared"
FIRST_READING = "current"
# Readings of section 3.2.3 (widths 12..256, four stages, A-QCF after each), each written out in full
# so that it does not depend on the defaults. Counts at paper widths in docs/model.md §6.
READINGS: dict[str, dict[str, object]] = {
    # the default: Algorithm 1 as written (one QConv_q/k/v, gate MLP and QConv_out called for both
    # directions), a 3x3x3 QConv_out, one conv per encoder stage, two per decoder stage, one in the
    # bottleneck (its count at paper widths: docs/model.md §6)
    DEFAULT_READING: {"fusion_out_kernel": 3, "fusion_weights": SHARED_WEIGHTS, "encoder_convs": 1,
                      "decoder_convs": 2, "bottleneck_convs": 1},
    # the network as first built (the default of checkpoints written before the readings existed)
    FIRST_READING: {"fusion_out_kernel": 3, "fusion_weights": SEPARATE_WEIGHTS, "encoder_convs": 2,
                    "decoder_convs": 2, "bottleneck_convs": 2},
    # a 1x1x1 QConv_out, separate weights per direction
    "paper-out1": {"fusion_out_kernel": 1, "fusion_weights": SEPARATE_WEIGHTS, "encoder_convs": 2,
                   "decoder_convs": 1, "bottleneck_convs": 1},
}
_KERNEL = 3
_SCALE = 2  # each encoder stage halves, each decoder stage doubles every axis
_SPATIAL_NDIM = 3


def complete_network_config(network: object) -> object:
    """A checkpoint's ``network`` hyper-parameters with the reading arguments it predates filled in.

    Checkpoints written before the reading options existed hold the network as first built
    (:data:`FIRST_READING`) but do not name its arguments, and rebuilding them with today's defaults
    would give another architecture. For a ``{"class_path", "init_args"}`` mapping whose class takes
    reading arguments (A-QCF-Net and the networks built from its parts), the arguments missing from
    ``init_args`` are set to their first-built values; anything else is returned unchanged.
    """
    import importlib
    import inspect

    if not (isinstance(network, Mapping) and isinstance(network.get("class_path"), str)):
        return network
    module_name, _, class_name = network["class_path"].rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module_name), class_name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return network
    init_args = dict(network.get("init_args") or {})
    missing = {k: v for k, v in READINGS[FIRST_READING].items() if k in parameters and k not in init_args}
    if not missing:
        return network
    return {**network, "init_args": {**init_args, **missing}}


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module`` (shared ones counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _check_convs(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AqcfError(f"{name}={value!r}: expected a positive integer")
    return value


def _check_architecture(
    widths: tuple, in_channels: int, num_classes: int, bottleneck: str, *convs: int
) -> None:
    """Refuse widths, channel counts, a bottleneck mode or conv counts :class:`AQCFNet` cannot build.

    ``convs``: the encoder, decoder and bottleneck conv counts, in that order.
    """
    for name, value in zip(("encoder_convs", "decoder_convs", "bottleneck_convs"), convs, strict=True):
        _check_convs(name, value)
    if len(widths) < 3 or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise AqcfError(f"widths={widths}: expected at least 3 positive integers (stem, stage 1.., bottleneck)")
    if in_channels < 1 or num_classes < 1:
        raise AqcfError(f"in_channels={in_channels}, num_classes={num_classes}: both must be >= 1")
    if bottleneck not in BOTTLENECKS:
        raise AqcfError(f"bottleneck={bottleneck!r}: expected one of {BOTTLENECKS}")


class EncoderStage(nn.Sequential):
    """A strided 3×3×3 conv block halving every axis, then ``convs - 1`` 3×3×3 conv blocks.

    Shapes: ``(B, in_channels, X, Y, Z)`` -> ``(B, out_channels, X/2, Y/2, Z/2)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, algebra: str, negative_slope: float, convs: int = 2
    ) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, _KERNEL, _SCALE, algebra, negative_slope),
            *(ConvNormAct(out_channels, out_channels, _KERNEL, 1, algebra, negative_slope) for _ in range(convs - 1)),
        )


class DecoderStage(nn.Module):
    """Upsample ×2 with a transposed conv, gate the skip, concatenate, ``convs`` 3×3×3 conv blocks.

    Args:
        deep_channels: real channels of the coarser input.
        skip_channels: real channels of the skip (and of the output).
        algebra: ``"quaternion"`` or ``"real"``.
        attention_gate: filter the skip with a :class:`QuaternionAttentionGate`.
        negative_slope: LeakyReLU slope.
        convs: conv blocks after the concatenation.

    Shapes:
        ``x (B, deep_channels, X/2, Y/2, Z/2)``, ``skip (B, skip_channels, X, Y, Z)``
        -> ``(B, skip_channels, X, Y, Z)``.
    """

    def __init__(
        self,
        deep_channels: int,
        skip_channels: int,
        algebra: str,
        attention_gate: bool,
        negative_slope: float,
        convs: int = 2,
    ) -> None:
        super().__init__()
        self.up = make_conv_transpose(algebra, deep_channels, skip_channels, _SCALE, _SCALE)
        if attention_gate:
            # Oktay et al.'s joint space has half the skip's width
            inter = QUATERNION_COMPONENTS * max(1, skip_channels // QUATERNION_COMPONENTS // 2)
            self.attention_gate = QuaternionAttentionGate(skip_channels, skip_channels, inter, algebra)
        else:
            self.attention_gate = None
        self.convs = nn.Sequential(
            ConvNormAct(2 * skip_channels, skip_channels, _KERNEL, 1, algebra, negative_slope),
            *(ConvNormAct(skip_channels, skip_channels, _KERNEL, 1, algebra, negative_slope) for _ in range(convs - 1)),
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        if self.attention_gate is not None:
            skip = self.attention_gate(skip, x)
        # per-component concatenation keeps the quaternion layout (harmless for real layers)
        return self.convs(quaternion_cat([skip, x]))


class Decoder(nn.Module):
    """The decoder of one stream: one :class:`DecoderStage` per encoder stage, deepest first.

    Args:
        channels: real channels per level, shallow to deep: ``4·(w0, ..., w_{n-1})``.
        bottom_channels: real channels of the bottleneck output.
        algebra, attention_gates, negative_slope: as :class:`AQCFNet`.
        convs: conv blocks per stage after the concatenation.
    """

    def __init__(
        self,
        channels: Sequence[int],
        bottom_channels: int,
        algebra: str,
        attention_gates: bool,
        negative_slope: float,
        convs: int = 2,
    ) -> None:
        super().__init__()
        deeper = [bottom_channels, *reversed(channels[1:])]
        self.stages = nn.ModuleList(
            DecoderStage(deep, skip, algebra, attention_gates, negative_slope, convs)
            for deep, skip in zip(deeper, reversed(channels), strict=True)
        )

    def forward(self, bottom: Tensor, skips: Sequence[Tensor]) -> Tensor:
        """``bottom``: bottleneck output; ``skips``: encoder features shallow to deep (one per stage)."""
        x = bottom
        for stage, skip in zip(self.stages, reversed(skips), strict=True):
            x = stage(x, skip)
        return x


class AQCFNet(nn.Module):
    """A-QCF-Net: two quaternion encoders joined by A-QCF blocks, a shared bottleneck, two decoders.

    Args:
        in_channels: image channels per modality.
        num_classes: output classes (background, liver, tumor).
        widths: quaternion channels ``(stem, stage 1, ..., stage n, bottleneck)``; ``n = len - 2``
            downsampling stages, so input sizes must be divisible by ``2**n`` (16 for the paper).
        gate: ``"adaptive"`` (λ learned, eq. 8) or ``"static"`` (λ ≡ 1).
        cross_fusion: build and apply the A-QCF blocks; ``False`` gives two independent streams.
        algebra: ``"quaternion"`` or ``"real"`` (same real widths with real layers).
        bottleneck: ``"shared"`` (one set of weights for both streams) or ``"separate"``.
        attention_gates: attention-gate the decoder skips.
        negative_slope: LeakyReLU slope.
        gate_reduction: reduction of the A-QCF gate MLP's hidden width.
        quaternion_product: ``"auto"``, ``"dense"`` or ``"fast"`` for every quaternion convolution
            (:func:`~aqcf.nn.quaternion.set_quaternion_product`); same parameters and output either way.
        fusion_out_kernel: kernel of the A-QCF blocks' ``QConv_out``, 3 or 1.
        fusion_weights: ``"separate"`` weights per A-QCF direction or ``"shared"`` between the two
            (Algorithm 1 calls the same ``QConv_q/k/v``, gate MLP and ``QConv_out`` for both).
        encoder_convs: conv blocks per encoder stage (the first one strided).
        decoder_convs: conv blocks per decoder stage after the skip concatenation.
        bottleneck_convs: conv blocks in the bottleneck.
        absent_context: what :meth:`forward_single` does with the context from the absent stream:
            ``"zero-filled"`` (eq. 17: the absent stream runs on zeros through the trained gates) or
            ``"off"`` (``λ = 0`` at every stage, eq. 10). Changes no parameter.
        modalities: the names of the streams, unique lowercase identifiers; they key the submodule
            dicts (``stems``, ``encoders``, ``decoders``, ``heads``), so the default pair keeps the
            two-stream ``state_dict`` keys. One name builds no A-QCF blocks.

    The defaults are reading ``"paper-shared"`` of :data:`READINGS` (Algorithm 1's shared A-QCF
    weights, 32.0 M parameters at paper widths); reading ``"current"`` is the network as first built,
    which checkpoints written before these options existed hold (:func:`complete_network_config`).

    Attributes:
        last_gates: after each forward, ``{"stage{s}/{source}_to_{target}": λ}`` (for the default
            pair ``"stage{s}/mri_to_ct"`` and ``"stage{s}/ct_to_mri"``), one per ordered pair of
            streams, with detached λ of shape ``(B,)`` for ``s = 1..n`` (empty without cross-fusion).
        last_context_rms: the same keys, the RMS of the gated context ``λ · C_raw`` each direction
            added to its target stream, detached, ``(B,)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        widths: Sequence[int] = PAPER_WIDTHS,
        gate: str = ADAPTIVE,
        cross_fusion: bool = True,
        algebra: str = QUATERNION,
        bottleneck: str = SHARED,
        attention_gates: bool = True,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
        gate_reduction: int = DEFAULT_GATE_REDUCTION,
        quaternion_product: str = AUTO,
        fusion_out_kernel: int = 3,
        fusion_weights: str = SHARED_WEIGHTS,
        encoder_convs: int = 1,
        decoder_convs: int = 2,
        bottleneck_convs: int = 1,
        absent_context: str = ZERO_FILLED,
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        super().__init__()
        self.modalities = check_modalities(modalities)
        widths = tuple(widths)
        convs = (encoder_convs, decoder_convs, bottleneck_convs)
        _check_architecture(widths, in_channels, num_classes, bottleneck, *convs)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.widths = widths
        self.gate = check_gate(gate)
        # one stream has nothing to fuse with
        self.cross_fusion = bool(cross_fusion) and len(self.modalities) > 1
        self.algebra = check_algebra(algebra)
        self.bottleneck_mode = bottleneck
        self.attention_gates = bool(attention_gates)
        self.absent_context = _check_absent_context(absent_context)
        self.num_stages = len(widths) - 2
        self.divisor = _SCALE**self.num_stages

        channels = [QUATERNION_COMPONENTS * w for w in widths]
        levels, bottom = channels[:-1], channels[-1]
        # Built in this order (the order the random initialisation draws in): stems, encoders, A-QCF
        # blocks, bottleneck, decoders, heads; the attribute names are the state-dict keys.
        self.stems = self._build_stems(levels[0], algebra, negative_slope)
        self.encoders = self._build_encoders(levels, algebra, negative_slope, encoder_convs)
        self.fusion = (
            self._build_fusion(levels, gate, algebra, gate_reduction, negative_slope, fusion_out_kernel, fusion_weights)
            if self.cross_fusion
            else None
        )
        self.bottleneck = self._build_bottleneck(levels[-1], bottom, algebra, negative_slope, bottleneck_convs)
        self.decoders = nn.ModuleDict(
            {
                m: Decoder(levels[:-1], bottom, algebra, self.attention_gates, negative_slope, decoder_convs)
                for m in self.modalities
            }
        )
        # a real 1x1x1 conv maps the quaternion features back to real class logits
        self.heads = nn.ModuleDict({m: nn.Conv3d(levels[0], num_classes, 1) for m in self.modalities})
        self.last_gates: dict[str, Tensor] = {}
        self.last_context_rms: dict[str, Tensor] = {}
        set_quaternion_product(self, quaternion_product)

    def _build_stems(self, channels: int, algebra: str, slope: float) -> nn.ModuleDict:
        """Per stream: a real conv block from the image channels to ``channels``, then one of ``algebra``."""
        # the first layer is real: one image channel is not a quaternion
        return nn.ModuleDict(
            {
                m: nn.Sequential(
                    ConvNormAct(self.in_channels, channels, _KERNEL, 1, REAL, slope),
                    ConvNormAct(channels, channels, _KERNEL, 1, algebra, slope),
                )
                for m in self.modalities
            }
        )

    def _build_encoders(self, levels: Sequence[int], algebra: str, slope: float, convs: int) -> nn.ModuleDict:
        """Per stream: one :class:`EncoderStage` from each level's real channels to the next's."""
        return nn.ModuleDict(
            {
                m: nn.ModuleList(
                    EncoderStage(c_in, c_out, algebra, slope, convs)
                    for c_in, c_out in zip(levels[:-1], levels[1:], strict=True)
                )
                for m in self.modalities
            }
        )

    def _build_fusion(
        self,
        levels: Sequence[int],
        gate: str,
        algebra: str,
        gate_reduction: int,
        slope: float,
        out_kernel: int,
        weights: str,
    ) -> nn.ModuleList:
        """One :class:`~aqcf.nn.fusion.AQCFBlock` per encoder stage (eq. 2-10 at each scale)."""
        return nn.ModuleList(
            AQCFBlock(c, gate, algebra, gate_reduction, slope, out_kernel, weights, self.modalities)
            for c in levels[1:]
        )

    def _build_bottleneck(self, channels_in: int, bottom: int, algebra: str, slope: float, convs: int) -> nn.Module:
        """``convs`` conv blocks to the bottleneck's width: one set (``shared``) or one per stream (``separate``)."""

        def make_bottleneck() -> nn.Module:
            return nn.Sequential(
                ConvNormAct(channels_in, bottom, _KERNEL, 1, algebra, slope),
                *(ConvNormAct(bottom, bottom, _KERNEL, 1, algebra, slope) for _ in range(convs - 1)),
            )

        if self.bottleneck_mode == SHARED:
            return make_bottleneck()
        return nn.ModuleDict({m: make_bottleneck() for m in self.modalities})

    def _bottleneck(self, modality: str) -> nn.Module:
        return self.bottleneck if self.bottleneck_mode == SHARED else self.bottleneck[modality]

    def _check_input(self, x: Tensor, name: str) -> None:
        if x.ndim != 2 + _SPATIAL_NDIM or x.shape[1] != self.in_channels:
            raise AqcfError(f"{name} input has shape {tuple(x.shape)}: expected (B, {self.in_channels}, X, Y, Z)")
        bad = [s for s in x.shape[2:] if s % self.divisor]
        if bad:
            raise AqcfError(
                f"{name} input has spatial size {tuple(x.shape[2:])}: every axis must be divisible by "
                f"{self.divisor} ({self.num_stages} halvings); pad the patch"
            )

    def _stream(self, modality: str) -> str:
        """``modality`` lower-cased if it names a stream of this network, else :class:`AqcfError`."""
        value = str(modality).lower()
        if value not in self.modalities:
            raise AqcfError(f"modality {modality!r} is not a stream of this network {self.modalities}")
        return value

    def _check_images(self, images: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``images`` keyed by stream name in ``modalities`` order, every tensor checked, shapes equal."""
        if not isinstance(images, Mapping) or not images:
            raise AqcfError(f"expected a non-empty mapping from stream name to image, streams {self.modalities}")
        named = {self._stream(m): x for m, x in images.items()}
        if len(named) != len(images):
            raise AqcfError(f"input streams {list(images)} name a stream twice")
        for m, x in named.items():
            self._check_input(x, m)
        first = next(iter(named))
        for m, x in named.items():
            if x.shape != named[first].shape:
                raise AqcfError(
                    f"{first} input {tuple(named[first].shape)} and {m} input {tuple(x.shape)} differ: the "
                    f"streams need the same batch size and patch size"
                )
        return {m: named[m] for m in self.modalities if m in named}

    def _encode(
        self, images: Mapping[str, Tensor], absent: tuple[str, ...] = ()
    ) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
        """Stems, encoder stages and A-QCF blocks; sets ``last_gates`` and ``last_context_rms``.

        Args:
            images: one checked image per stream of ``modalities``.
            absent: streams whose context into every other stream is switched off (``λ = 0``).

        Returns:
            the deepest features per modality and the skips (shallow to deep, one per decoder stage).
        """
        n = len(self.modalities)
        features = {m: self.stems[m](images[m]) for m in self.modalities}
        levels: dict[str, list[Tensor]] = {m: [features[m]] for m in self.modalities}
        gates: dict[str, Tensor] = {}
        context_rms: dict[str, Tensor] = {}
        for s in range(self.num_stages):
            features = {m: self.encoders[m][s](features[m]) for m in self.modalities}
            if self.fusion is not None:
                block = self.fusion[s]
                out = block(*(features[m] for m in self.modalities), absent=absent)
                features = dict(zip(self.modalities, out[:n], strict=True))
                for (source, target), gate in zip(block.directions, out[n:], strict=True):
                    gates[f"stage{s + 1}/{direction_name(source, target)}"] = gate.detach().flatten()
                context_rms.update({f"stage{s + 1}/{d}": v for d, v in block.last_context_rms.items()})
            for m in self.modalities:
                levels[m].append(features[m])
        self.last_gates = gates
        self.last_context_rms = context_rms
        return {m: levels[m][-1] for m in self.modalities}, {m: levels[m][:-1] for m in self.modalities}

    def _decode(self, modality: str, deepest: Tensor, skips: list[Tensor]) -> Tensor:
        # the shared bottleneck is applied to each stream on its own (never batched together), so a
        # stream's output does not depend on whether another stream is decoded too
        bottom = self._bottleneck(modality)(deepest)
        return self.heads[modality](self.decoders[modality](bottom, skips))

    def forward(self, *images: Tensor) -> tuple[Tensor, ...]:
        """Joint pass, one batch per stream in ``modalities`` order: ``net(ct, mri)`` for the default pair.

        The batches are unpaired: only the shapes correspond.

        Args:
            *images: ``(B, in_channels, X, Y, Z)`` each, each axis divisible by ``2**num_stages``, all
                of the same shape.

        Returns:
            the logits per stream in ``modalities`` order (``(logits_ct, logits_mri)``), each
            ``(B, num_classes, X, Y, Z)``.
        """
        if len(images) != len(self.modalities):
            raise AqcfError(f"got {len(images)} input batches: expected one per stream {self.modalities}")
        logits = self.forward_streams(dict(zip(self.modalities, images, strict=True)))
        return tuple(logits[m] for m in self.modalities)

    def forward_streams(self, images: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Joint pass on every stream: ``{name: (B, in_channels, X, Y, Z)}`` -> ``{name: logits}``.

        Every stream of ``modalities`` must be given, all of one shape; :meth:`forward_present` takes
        a subset.
        """
        named = self._check_images(images)
        missing = [m for m in self.modalities if m not in named]
        if missing:
            raise AqcfError(f"no input for stream(s) {missing}: forward_present zero-fills absent streams")
        deepest, skips = self._encode(named)
        return {m: self._decode(m, deepest[m], skips[m]) for m in self.modalities}

    def forward_present(
        self,
        images: Mapping[str, Tensor],
        outputs: Sequence[str] | None = None,
        absent_context: str | None = None,
    ) -> dict[str, Tensor]:
        """Inference on the streams present (eq. 17): every absent stream gets zeros.

        Every encoder and A-QCF block runs as in training (absent streams on zeros); only the
        bottleneck passes and decoders of the streams not asked for are skipped, which feed nothing
        the requested logits depend on, so each result equals :meth:`forward_streams` with zero tensors
        for the absent streams. ``absent_context="off"`` sets ``λ = 0`` (and ``C_raw = 0``) at every
        stage for every direction whose source is absent (eq. 10), so a stream present alone gets
        ``QConv_out(concat[F, 0])`` from every block.

        Args:
            images: ``{name: (B, in_channels, X, Y, Z)}`` for the present streams, all of one shape.
            outputs: the streams whose logits to compute; ``None``: the present streams.
            absent_context: ``"zero-filled"`` or ``"off"``; ``None`` takes ``self.absent_context``.

        Returns:
            ``{name: (B, num_classes, X, Y, Z)}`` for ``outputs``, in that order.
        """
        mode = self.absent_context if absent_context is None else _check_absent_context(absent_context)
        present = self._check_images(images)
        wanted = tuple(present) if outputs is None else tuple(dict.fromkeys(self._stream(m) for m in outputs))
        if not wanted:
            raise AqcfError("outputs=[]: ask for the logits of at least one stream")
        like = next(iter(present.values()))
        full = {m: present[m] if m in present else torch.zeros_like(like) for m in self.modalities}
        off = tuple(m for m in self.modalities if m not in present) if mode == CONTEXT_OFF else ()
        deepest, skips = self._encode(full, off)
        return {m: self._decode(m, deepest[m], skips[m]) for m in wanted}

    def forward_single(self, x: Tensor, modality: str, absent_context: str | None = None) -> Tensor:
        """Unimodal inference (eq. 17): the absent streams get zeros, the graph is the training graph.

        :meth:`forward_present` with ``{modality: x}``. Every encoder and the A-QCF blocks run as in
        training; only the absent streams' bottleneck passes and decoders are skipped, which feed
        nothing the present output depends on, so the result equals ``forward`` with zero tensors for
        the other streams. A zero-filled absent stream is not zero after its first norm layer (and is
        filled with the present stream's features by the other direction), so the present stream does
        receive context from it; ``absent_context="off"`` sets those directions' ``λ`` to 0 at every
        stage instead, so every A-QCF block gives the present stream ``QConv_out(concat[F, 0])``
        (eq. 10).

        Args:
            x: ``(B, in_channels, X, Y, Z)``.
            modality: a stream name (``"ct"`` or ``"mri"`` for the default pair), any case.
            absent_context: ``"zero-filled"`` or ``"off"``; ``None`` takes ``self.absent_context``.

        Returns:
            logits of ``modality``, ``(B, num_classes, X, Y, Z)``.
        """
        modality = self._stream(modality)
        return self.forward_present({modality: x}, absent_context=absent_context)[modality]

def _check_absent_context(value: str) -> str:
    if value not in ABSENT_CONTEXTS:
        raise AqcfError(f"absent_context={value!r}: expected one of {ABSENT_CONTEXTS}")
    return value
