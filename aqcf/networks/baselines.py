"""Baselines trained in the same pipeline as A-QCF-Net (paper section 4.1.3).

Every baseline goes through the same :class:`~aqcf.models.segmentation.SegmentationModule` (same folds,
preprocessing, augmentation, DiceCE loss, optimizer, schedule and sliding-window validation); only the
network differs. The module needs ``forward(ct, mri) -> (logits_ct, logits_mri)`` and
``forward_single(x, modality)``; a single-stream network gets them from one of two wrappers:

* :class:`SharedStream` — one network for both cohorts, blind to the modality (the joint baselines);
* :class:`SingleModality` — a network trained and used on one modality only (the unimodal, "data
  silo" baselines of section 2); it declares ``modalities = (modality,)`` so the loss and validation
  cover that modality alone, and its config sets the other cohort's root to null.

Networks: :class:`QuaternionUNet` (one stream of A-QCF-Net, no fusion; :class:`UnimodalNet` wraps it for
one modality), :class:`NNUNetStyleUNet` (MONAI ``DynUNet`` with nnU-Net's planning rule for kernels and
strides, the in-pipeline stand-in for nnU-Net), and MONAI's ``AttentionUnet``, ``UNETR`` and
``SwinUNETR`` used as they are (``class_path: monai.networks.nets.…`` in the configs).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from aqcf.constants import CT, MODALITIES, MRI, check_modality
from aqcf.errors import AqcfError
from aqcf.networks.aqcfnet import DEFAULT_READING, PAPER_WIDTHS, READINGS, SHARED, AQCFNet
from aqcf.nn.blocks import DEFAULT_NEGATIVE_SLOPE, QUATERNION

__all__ = [
    "SharedStream",
    "SingleModality",
    "QuaternionUNet",
    "UnimodalNet",
    "NNUNetStyleUNet",
    "nnunet_topology",
    "NNUNET_BASE_FILTERS",
    "NNUNET_MAX_FILTERS",
    "NNUNET_MIN_FEATURE_SIZE",
]

# nnU-Net v2's planner defaults for 3D full-resolution U-Nets
NNUNET_BASE_FILTERS = 32
NNUNET_MAX_FILTERS = 320
NNUNET_MIN_FEATURE_SIZE = 4  # smallest edge of a bottleneck feature map, in voxels
_ANISOTROPY_RATIO = 2.0  # an axis pools (and gets 3-wide kernels) while its spacing is within 2x of the finest
_SINGLE_AXIS_FACTOR = 3  # pooling a lone axis needs at least 3x the minimum feature size
_SPATIAL_DIMS = 3
_DEFAULT_READING = READINGS[DEFAULT_READING]  # conv counts per stage: the joint network's


class _Wrapper(nn.Module):
    """Holds a single-stream network; passes on its ``divisor`` (input axes must be multiples of it)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    @property
    def divisor(self) -> int:
        """What every input axis must be divisible by, as the wrapped network declares it (else 1)."""
        return int(getattr(self.network, "divisor", 1))


class SharedStream(_Wrapper):
    """One single-stream network applied to both modalities (a joint, modality-agnostic baseline).

    The two cohorts are passed through the network one after the other, never batched together, so a
    modality's logits do not depend on the other modality's batch (batch norm statistics included).

    Args:
        network: maps ``(B, C_in, X, Y, Z)`` to logits ``(B, num_classes, X, Y, Z)``.
    """

    modalities = MODALITIES

    def forward(self, ct: Tensor, mri: Tensor) -> tuple[Tensor, Tensor]:
        """``(network(ct), network(mri))``, each ``(B, num_classes, X, Y, Z)``."""
        return self.network(ct), self.network(mri)

    def forward_single(self, x: Tensor, modality: str) -> Tensor:
        """``network(x)``: the modality is checked, not used (the network is modality-agnostic)."""
        check_modality(modality)
        return self.network(x)


class SingleModality(_Wrapper):
    """A single-stream network trained and used on one modality only (a unimodal baseline).

    Args:
        network: maps ``(B, C_in, X, Y, Z)`` to logits ``(B, num_classes, X, Y, Z)``.
        modality: ``"ct"`` or ``"mri"``.

    Attributes:
        modalities: ``(modality,)``; :class:`~aqcf.models.segmentation.SegmentationModule` then trains and
            validates on that modality alone.
    """

    def __init__(self, network: nn.Module, modality: str) -> None:
        super().__init__(network)
        self.modality = check_modality(modality)
        self.modalities = (self.modality,)

    def forward(self, ct: Tensor | None = None, mri: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """The joint signature: logits of the served modality, ``None`` for the other (not run).

        Args:
            ct: ``(B, C_in, X, Y, Z)`` or None.
            mri: ``(B, C_in, X, Y, Z)`` or None.

        Returns:
            ``(logits_ct, logits_mri)``; the entry of the modality this network does not serve is None.
        """
        inputs = {CT: ct, MRI: mri}
        if inputs[self.modality] is None:
            raise AqcfError(f"this network serves {self.modality} only and got no {self.modality} input")
        logits = self.network(inputs[self.modality])
        return (logits, None) if self.modality == CT else (None, logits)

    def forward_single(self, x: Tensor, modality: str) -> Tensor:
        """Logits ``(B, num_classes, X, Y, Z)`` of ``x``; ``modality`` must be the one this network serves."""
        if check_modality(modality) != self.modality:
            raise AqcfError(f"this network was trained on {self.modality} only and cannot segment {modality}")
        return self.network(x)


class QuaternionUNet(nn.Module):
    """One stream of A-QCF-Net without fusion: stem, encoder stages, bottleneck, gated decoder, head.

    The parts are taken from an :class:`~aqcf.networks.aqcfnet.AQCFNet` built without cross-fusion, so the
    architecture (and, for the same seed, the initial weights) is exactly that network's CT stream.

    Args:
        in_channels, num_classes, widths, algebra, attention_gates, negative_slope, encoder_convs,
            decoder_convs, bottleneck_convs: as :class:`~aqcf.networks.aqcfnet.AQCFNet` (same defaults).

    Shapes:
        ``(B, in_channels, X, Y, Z)`` -> ``(B, num_classes, X, Y, Z)``, each axis divisible by
        ``2**(len(widths) - 2)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        widths: Sequence[int] = PAPER_WIDTHS,
        algebra: str = QUATERNION,
        attention_gates: bool = True,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
        encoder_convs: int = _DEFAULT_READING["encoder_convs"],
        decoder_convs: int = _DEFAULT_READING["decoder_convs"],
        bottleneck_convs: int = _DEFAULT_READING["bottleneck_convs"],
    ) -> None:
        super().__init__()
        streams = AQCFNet(
            in_channels,
            num_classes,
            widths,
            cross_fusion=False,
            algebra=algebra,
            bottleneck=SHARED,
            attention_gates=attention_gates,
            negative_slope=negative_slope,
            encoder_convs=encoder_convs,
            decoder_convs=decoder_convs,
            bottleneck_convs=bottleneck_convs,
        )
        self.in_channels = in_channels
        self.divisor = streams.divisor
        self.stem = streams.stems[CT]
        self.encoder = streams.encoders[CT]
        self.bottleneck = streams.bottleneck
        self.decoder = streams.decoders[CT]
        self.head = streams.heads[CT]

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 + _SPATIAL_DIMS or x.shape[1] != self.in_channels:
            raise AqcfError(f"input has shape {tuple(x.shape)}: expected (B, {self.in_channels}, X, Y, Z)")
        if any(s % self.divisor for s in x.shape[2:]):
            raise AqcfError(
                f"input has spatial size {tuple(x.shape[2:])}: every axis must be divisible by {self.divisor}"
            )
        levels = [self.stem(x)]
        for stage in self.encoder:
            levels.append(stage(levels[-1]))
        bottom = self.bottleneck(levels[-1])
        return self.head(self.decoder(bottom, levels[:-1]))


class UnimodalNet(SingleModality):
    """The data-silo baseline: a :class:`QuaternionUNet` trained on one modality.

    Its arguments are A-QCF-Net's (minus the fusion ones), so a config layered on the paper's keeps the
    widths, algebra and attention gates of the base config.

    Args:
        modality: ``"ct"`` or ``"mri"``.
        in_channels, num_classes, widths, algebra, attention_gates, negative_slope, encoder_convs,
            decoder_convs, bottleneck_convs: as :class:`~aqcf.networks.aqcfnet.AQCFNet`.
    """

    def __init__(
        self,
        modality: str,
        in_channels: int = 1,
        num_classes: int = 3,
        widths: Sequence[int] = PAPER_WIDTHS,
        algebra: str = QUATERNION,
        attention_gates: bool = True,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
        encoder_convs: int = _DEFAULT_READING["encoder_convs"],
        decoder_convs: int = _DEFAULT_READING["decoder_convs"],
        bottleneck_convs: int = _DEFAULT_READING["bottleneck_convs"],
    ) -> None:
        network = QuaternionUNet(in_channels, num_classes, widths, algebra, attention_gates, negative_slope,
                                 encoder_convs, decoder_convs, bottleneck_convs)
        super().__init__(network, modality)


def nnunet_topology(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    min_feature_size: int = NNUNET_MIN_FEATURE_SIZE,
) -> tuple[list[list[int]], list[list[int]]]:
    """Conv kernel sizes and strides per resolution stage by nnU-Net's planning rule.

    The rule of nnU-Net v2's planner (``get_pool_and_conv_props``): at each step, every axis whose
    feature map is at least ``2 * min_feature_size`` long and whose current spacing is within a factor
    2 of the finest such spacing is halved (a lone axis only if at least ``3 * min_feature_size`` long);
    an axis gets 3-wide kernels from the first stage at which its spacing is within a factor 2 of the
    finest spacing, 1-wide before. The bottleneck always gets 3-wide kernels.

    Args:
        patch_size: ``(X, Y, Z)`` in voxels.
        spacing: voxel size ``(X, Y, Z)`` in mm.
        min_feature_size: smallest edge of a bottleneck feature map, in voxels.

    Returns:
        ``(kernel_sizes, strides)``: one ``[kx, ky, kz]`` per stage; the first stride is ``[1, 1, 1]``.
    """
    if len(patch_size) != _SPATIAL_DIMS or len(spacing) != _SPATIAL_DIMS:
        raise AqcfError(f"patch_size {patch_size} and spacing {spacing}: need three values each")
    if min(patch_size) < 1 or min(spacing) <= 0:
        raise AqcfError(f"patch_size {patch_size} and spacing {spacing}: need positive values")
    size = [float(s) for s in patch_size]
    current = [float(s) for s in spacing]
    kernel = [1] * _SPATIAL_DIMS
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1] * _SPATIAL_DIMS]
    while True:
        long_enough = [d for d in range(_SPATIAL_DIMS) if size[d] >= 2 * min_feature_size]
        if not long_enough:
            break
        finest = min(current[d] for d in long_enough)
        axes = [d for d in long_enough if current[d] / finest < _ANISOTROPY_RATIO]
        if len(axes) == 1 and size[axes[0]] < _SINGLE_AXIS_FACTOR * min_feature_size:
            break
        finest_all = min(current)
        kernel = [3 if k == 3 or current[d] / finest_all < _ANISOTROPY_RATIO else 1 for d, k in enumerate(kernel)]
        stride = [2 if d in axes else 1 for d in range(_SPATIAL_DIMS)]
        for d in axes:
            current[d] *= 2
            size[d] = -(-size[d] // 2)  # ceil
        kernels.append(list(kernel))
        strides.append(stride)
    kernels.append([3] * _SPATIAL_DIMS)
    return kernels, strides


def _dynunet():
    from monai.networks.nets import DynUNet

    return DynUNet


class NNUNetStyleUNet(nn.Module):
    """A plain 3D U-Net in nnU-Net's style: MONAI ``DynUNet`` planned by :func:`nnunet_topology`.

    Two conv-instance norm-leaky ReLU blocks per stage, strided convs to downsample, transposed convs to
    upsample, ``base_filters`` doubling per stage up to ``max_filters`` (nnU-Net v2's 32 and 320). It is
    the stand-in for nnU-Net inside this pipeline (same preprocessing, patches, loss and schedule);
    unlike nnU-Net it trains without deep supervision, since the shared training step scores one output.

    Args:
        patch_size: training patch ``(X, Y, Z)`` in voxels (the config's ``data.patch_size``); each axis
            must be divisible by its total stride.
        spacing: voxel size ``(X, Y, Z)`` in mm after preprocessing (``data.ct_spacing``).
        in_channels: image channels.
        num_classes: output classes.
        base_filters: filters of the first stage.
        max_filters: cap on the filters of any stage.
        min_feature_size: smallest edge of a bottleneck feature map, in voxels.

    Shapes:
        ``(B, in_channels, X, Y, Z)`` -> ``(B, num_classes, X, Y, Z)``.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        in_channels: int = 1,
        num_classes: int = 3,
        base_filters: int = NNUNET_BASE_FILTERS,
        max_filters: int = NNUNET_MAX_FILTERS,
        min_feature_size: int = NNUNET_MIN_FEATURE_SIZE,
    ) -> None:
        super().__init__()
        kernels, strides = nnunet_topology(patch_size, spacing, min_feature_size)
        for axis, size in enumerate(patch_size):
            total = 1
            for stride in strides:
                total *= stride[axis]
            if size % total:
                raise AqcfError(
                    f"patch_size {tuple(patch_size)}: axis {axis} ({size}) is not divisible by its total stride "
                    f"{total}; choose a patch that is"
                )
        self.kernel_sizes = kernels
        self.strides = strides
        self.filters = [min(base_filters * 2**i, max_filters) for i in range(len(strides))]
        self.unet = _dynunet()(
            spatial_dims=_SPATIAL_DIMS,
            in_channels=in_channels,
            out_channels=num_classes,
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=self.filters,
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": DEFAULT_NEGATIVE_SLOPE}),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.unet(x)
