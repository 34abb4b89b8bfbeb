"""Convolution blocks shared by the network parts, in either algebra.

``algebra="quaternion"`` builds :class:`~aqcf.nn.quaternion.QuaternionConv3d` layers;
``algebra="real"`` builds ``nn.Conv3d`` layers of the same real shape (the "No Quaternions" ablation of
Table 7, about four times the weights). Normalisation is instance norm on every real channel
(nnU-Net's choice; batch norm would mix CT and MRI statistics in the shared bottleneck).
"""

from __future__ import annotations

from torch import nn

from aqcf.errors import AqcfError
from aqcf.nn.quaternion import QuaternionConv3d, QuaternionConvTranspose3d

__all__ = [
    "QUATERNION",
    "REAL",
    "ALGEBRAS",
    "DEFAULT_NEGATIVE_SLOPE",
    "check_algebra",
    "make_conv",
    "make_conv_transpose",
    "ConvNormAct",
]

QUATERNION = "quaternion"
REAL = "real"
ALGEBRAS = (QUATERNION, REAL)
DEFAULT_NEGATIVE_SLOPE = 0.01


def check_algebra(algebra: str) -> str:
    """Return ``algebra`` if it is ``"quaternion"`` or ``"real"``, else raise :class:`AqcfError`."""
    if algebra not in ALGEBRAS:
        raise AqcfError(f"algebra={algebra!r}: expected one of {ALGEBRAS}")
    return algebra


def _he_init_real(layer: nn.Module, negative_slope: float) -> nn.Module:
    # the real layers get the same He scale as the quaternion ones, so the ablation differs in algebra only
    nn.init.kaiming_normal_(layer.weight, a=negative_slope, nonlinearity="leaky_relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def make_conv(
    algebra: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    bias: bool = True,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> nn.Module:
    """A 3D convolution with "same" padding (odd kernels) in the given algebra.

    Args:
        algebra: ``"quaternion"`` or ``"real"``.
        in_channels: real input channels (a multiple of 4 for quaternion layers).
        out_channels: real output channels (a multiple of 4 for quaternion layers).
        kernel_size: odd kernel size in voxels.
        stride: stride in voxels (2 halves each axis of an even-sized input).
        bias: learnable bias per real output channel.
        negative_slope: slope of the following LeakyReLU, for the He scale of real layers.
    """
    if check_algebra(algebra) == QUATERNION:
        return QuaternionConv3d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
    conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
    return _he_init_real(conv, negative_slope)


def make_conv_transpose(
    algebra: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    bias: bool = True,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> nn.Module:
    """A 3D transposed convolution (upsampling by ``stride``) in the given algebra."""
    if check_algebra(algebra) == QUATERNION:
        return QuaternionConvTranspose3d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
    conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
    return _he_init_real(conv, negative_slope)


class ConvNormAct(nn.Sequential):
    """Convolution, instance norm (affine, per real channel), LeakyReLU.

    Instance norm acts on each real channel, i.e. on each quaternion component separately (a
    quaternion whitening norm is not used).

    Args:
        in_channels: real input channels.
        out_channels: real output channels.
        kernel_size: odd kernel size in voxels.
        stride: stride in voxels.
        algebra: ``"quaternion"`` or ``"real"``.
        negative_slope: LeakyReLU slope.

    Shapes:
        ``(B, in_channels, X, Y, Z)`` -> ``(B, out_channels, X / stride, Y / stride, Z / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        algebra: str = QUATERNION,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> None:
        # no conv bias: instance norm subtracts each channel's mean, which cancels it exactly
        super().__init__(
            make_conv(algebra, in_channels, out_channels, kernel_size, stride, False, negative_slope),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(negative_slope, inplace=True),
        )
