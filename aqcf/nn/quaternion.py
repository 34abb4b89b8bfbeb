"""Quaternion convolutions (paper section 3.2.1, eqs. 2-3), written by hand: no library has them.

Layout: a real tensor of shape ``(B, 4C, X, Y, Z)`` holds ``C`` quaternion channels as four contiguous
blocks ``[r(C), i(C), j(C), k(C)]``. A quaternion convolution with kernel ``W = Wr + Wi i + Wj j + Wk k``
computes, at every voxel and summed over kernel offsets, the *left* Hamilton product ``W ⊗ x``. It is
realised as one real convolution whose weight is assembled from the four sub-kernels as in eq. 2::

    | Wr -Wi -Wj -Wk |   | xr |
    | Wi  Wr -Wk  Wj | · | xi |
    | Wj  Wk  Wr -Wi |   | xj |
    | Wk -Wj  Wi  Wr |   | xk |

so the layer holds a quarter of the weights of a real convolution of the same real shape (eq. 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqcf.errors import AqcfError

__all__ = [
    "QUATERNION_COMPONENTS",
    "INIT_CRITERIA",
    "hamilton_product",
    "quaternion_split",
    "quaternion_cat",
    "check_quaternion_channels",
    "quaternion_init_",
    "QuaternionConv3d",
    "QuaternionConvTranspose3d",
]

QUATERNION_COMPONENTS = 4
INIT_CRITERIA = ("he", "glorot")
_SPATIAL_DIMS = 3


def check_quaternion_channels(channels: int, name: str = "channels") -> int:
    """Return the number of quaternion channels in ``channels`` real channels, or raise.

    Raises:
        AqcfError: if ``channels`` is not a positive multiple of 4.
    """
    if channels <= 0 or channels % QUATERNION_COMPONENTS:
        raise AqcfError(
            f"{name}={channels}: a quaternion layer needs a positive multiple of 4 real channels "
            f"(4 real channels = 1 quaternion channel)"
        )
    return channels // QUATERNION_COMPONENTS


def quaternion_split(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split ``(B, 4C, ...)`` into its four components ``r, i, j, k``, each ``(B, C, ...)``."""
    check_quaternion_channels(x.shape[1], "input channels")
    return tuple(torch.chunk(x, QUATERNION_COMPONENTS, dim=1))  # type: ignore[return-value]


def hamilton_product(q: Tensor, p: Tensor) -> Tensor:
    """Element-wise Hamilton product ``q ⊗ p`` of two tensors in the block layout.

    Args:
        q: ``(B, 4C, ...)``, components ``[r, i, j, k]`` as contiguous blocks of ``C`` channels.
        p: same shape as ``q`` (or broadcastable to it per component).

    Returns:
        ``(B, 4C, ...)``: ``q ⊗ p`` per quaternion channel and voxel (not commutative).
    """
    qr, qi, qj, qk = quaternion_split(q)
    pr, pi, pj, pk = quaternion_split(p)
    return torch.cat(
        [
            qr * pr - qi * pi - qj * pj - qk * pk,
            qr * pi + qi * pr + qj * pk - qk * pj,
            qr * pj - qi * pk + qj * pr + qk * pi,
            qr * pk + qi * pj - qj * pi + qk * pr,
        ],
        dim=1,
    )


def quaternion_cat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate quaternion tensors along channels *per component*.

    A plain ``torch.cat`` of ``[r_a, i_a, j_a, k_a]`` and ``[r_b, i_b, j_b, k_b]`` would put
    ``i_a`` in the real block of the result; concatenating per component gives
    ``[r_a, r_b, i_a, i_b, j_a, j_b, k_a, k_b]``, again a valid block layout with ``C_a + C_b``
    quaternion channels.

    Args:
        tensors: tensors ``(B, 4C_n, X, Y, Z)`` with equal batch and spatial sizes.

    Returns:
        ``(B, 4 sum(C_n), X, Y, Z)``.
    """
    parts = [quaternion_split(t) for t in tensors]
    return torch.cat([torch.cat([p[c] for p in parts], dim=1) for c in range(QUATERNION_COMPONENTS)], dim=1)


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value,) * _SPATIAL_DIMS
    value = tuple(int(v) for v in value)
    if len(value) != _SPATIAL_DIMS:
        raise AqcfError(f"expected an int or {_SPATIAL_DIMS} ints, got {value}")
    return value  # type: ignore[return-value]


@torch.no_grad()
def quaternion_init_(components: Sequence[Tensor], fan_in: float, fan_out: float, criterion: str = "he") -> None:
    """Fill four sub-kernels in place with the quaternion initialisation of Parcollet et al. (2019).

    Each weight quaternion is ``|w| (cos θ + u sin θ)`` with modulus ``|w| ~ chi(4)`` of scale
    ``σ = 1/sqrt(2 fan_in)`` ("he") or ``1/sqrt(2 (fan_in + fan_out))`` ("glorot"), a unit pure
    quaternion axis ``u`` drawn uniformly on the sphere and a phase ``θ ~ U[-π, π]``. Fans count
    quaternion inputs/outputs times the receptive field. Drawn with ``torch``'s global generator, so
    ``torch.manual_seed`` makes it reproducible.

    Args:
        components: ``(Wr, Wi, Wj, Wk)``, four tensors of equal shape.
        fan_in: quaternion fan-in.
        fan_out: quaternion fan-out.
        criterion: ``"he"`` or ``"glorot"``.
    """
    if criterion not in INIT_CRITERIA:
        raise AqcfError(f"init={criterion!r}: expected one of {INIT_CRITERIA}")
    w_r, w_i, w_j, w_k = components
    shape, device, dtype = w_r.shape, w_r.device, w_r.dtype
    scale = 1.0 / math.sqrt(2.0 * (fan_in if criterion == "he" else fan_in + fan_out))
    # chi(4) with scale σ is the norm of a 4-vector of N(0, σ²) draws
    modulus = scale * torch.randn((QUATERNION_COMPONENTS, *shape), device=device, dtype=dtype).norm(dim=0)
    axis = torch.randn((QUATERNION_COMPONENTS - 1, *shape), device=device, dtype=dtype)
    axis = axis / axis.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)
    phase = (torch.rand(shape, device=device, dtype=dtype) * 2.0 - 1.0) * math.pi
    w_r.copy_(modulus * torch.cos(phase))
    sin = modulus * torch.sin(phase)
    w_i.copy_(sin * axis[0])
    w_j.copy_(sin * axis[1])
    w_k.copy_(sin * axis[2])


class _QuaternionConvBase(nn.Module):
    """Four sub-kernels ``r, i, j, k`` of shape ``(dim0, dim1, *kernel)`` and a real bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        sub_kernel_dims: tuple[int, int],
        bias: bool,
        init: str,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.q_in = check_quaternion_channels(in_channels, "in_channels")
        self.q_out = check_quaternion_channels(out_channels, "out_channels")
        if init not in INIT_CRITERIA:
            raise AqcfError(f"init={init!r}: expected one of {INIT_CRITERIA}")
        self.init = init
        self.kernel_size = _triple(kernel_size)
        shape = (*sub_kernel_dims, *self.kernel_size)
        self.r_weight = nn.Parameter(torch.empty(shape))
        self.i_weight = nn.Parameter(torch.empty(shape))
        self.j_weight = nn.Parameter(torch.empty(shape))
        self.k_weight = nn.Parameter(torch.empty(shape))
        # the bias acts on real channels, as in Parcollet et al.'s layers
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    def _fans(self) -> tuple[float, float]:
        receptive = math.prod(self.kernel_size)
        return self.q_in * receptive, self.q_out * receptive

    def reset_parameters(self) -> None:
        fan_in, fan_out = self._fans()
        quaternion_init_((self.r_weight, self.i_weight, self.j_weight, self.k_weight), fan_in, fan_out, self.init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class QuaternionConv3d(_QuaternionConvBase):
    """3D quaternion convolution: ``y = W ⊗ x`` (left Hamilton product) summed over the kernel.

    Args:
        in_channels: real input channels (a multiple of 4).
        out_channels: real output channels (a multiple of 4).
        kernel_size: kernel size in voxels (int or three ints).
        stride: stride in voxels.
        padding: zero padding in voxels; default ``dilation * (kernel_size - 1) // 2`` ("same" for odd
            kernels at stride 1, exact halving at stride 2 for even input sizes).
        dilation: kernel dilation.
        bias: add a learnable real bias per output channel.
        init: ``"he"`` or ``"glorot"`` scale of the quaternion initialisation.

    Shapes:
        input ``(B, in_channels, X, Y, Z)`` -> output ``(B, out_channels, X', Y', Z')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | None = None,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        init: str = "he",
    ) -> None:
        q_in = check_quaternion_channels(in_channels, "in_channels")
        q_out = check_quaternion_channels(out_channels, "out_channels")
        super().__init__(in_channels, out_channels, kernel_size, (q_out, q_in), bias, init)
        self.stride = _triple(stride)
        self.dilation = _triple(dilation)
        if padding is None:
            padding = tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation, strict=True))
        self.padding = _triple(padding)
        self.reset_parameters()

    def real_weight(self) -> Tensor:
        """The real kernel of eq. 2, shape ``(out_channels, in_channels, *kernel_size)``."""
        r, i, j, k = self.r_weight, self.i_weight, self.j_weight, self.k_weight
        # block row n gives output component n; block column m multiplies input component m
        return torch.cat(
            [
                torch.cat([r, -i, -j, -k], dim=1),
                torch.cat([i, r, -k, j], dim=1),
                torch.cat([j, k, r, -i], dim=1),
                torch.cat([k, -j, i, r], dim=1),
            ],
            dim=0,
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.conv3d(x, self.real_weight(), self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, init={self.init!r}"
        )


class QuaternionConvTranspose3d(_QuaternionConvBase):
    """3D transposed quaternion convolution, also computing ``W ⊗ x``.

    ``F.conv_transpose3d`` takes a weight of shape ``(in, out, ...)`` and applies its transpose, so
    the eq. 2 block matrix is laid out transposed here (block row = input component). Reusing the
    forward layout would apply ``Wᵀ``, i.e. ``conj(W) ⊗ x``.

    Args:
        in_channels: real input channels (a multiple of 4).
        out_channels: real output channels (a multiple of 4).
        kernel_size: kernel size in voxels.
        stride: stride (upsampling factor) in voxels.
        padding: as ``nn.ConvTranspose3d``.
        output_padding: as ``nn.ConvTranspose3d``.
        dilation: kernel dilation.
        bias: add a learnable real bias per output channel.
        init: ``"he"`` or ``"glorot"``.

    Shapes:
        input ``(B, in_channels, X, Y, Z)`` -> output ``(B, out_channels, X', Y', Z')`` with
        ``X' = (X - 1) stride - 2 padding + dilation (kernel - 1) + output_padding + 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        output_padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        init: str = "he",
    ) -> None:
        q_in = check_quaternion_channels(in_channels, "in_channels")
        q_out = check_quaternion_channels(out_channels, "out_channels")
        super().__init__(in_channels, out_channels, kernel_size, (q_in, q_out), bias, init)
        self.stride = _triple(stride)
        self.padding = _triple(padding)
        self.output_padding = _triple(output_padding)
        self.dilation = _triple(dilation)
        self.reset_parameters()

    def _fans(self) -> tuple[float, float]:
        # an output voxel of a strided transposed conv receives about prod(kernel / stride) taps
        receptive = math.prod(self.kernel_size)
        overlap = max(1.0, receptive / math.prod(self.stride))
        return self.q_in * overlap, self.q_out * receptive

    def real_weight(self) -> Tensor:
        """The transposed eq. 2 kernel, shape ``(in_channels, out_channels, *kernel_size)``."""
        r, i, j, k = self.r_weight, self.i_weight, self.j_weight, self.k_weight
        # block row m = input component m; block column n = output component n (eq. 2 transposed)
        return torch.cat(
            [
                torch.cat([r, i, j, k], dim=1),
                torch.cat([-i, r, k, -j], dim=1),
                torch.cat([-j, -k, r, i], dim=1),
                torch.cat([-k, j, -i, r], dim=1),
            ],
            dim=0,
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.conv_transpose3d(
            x, self.real_weight(), self.bias, self.stride, self.padding, self.output_padding, 1, self.dilation
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, init={self.init!r}"
        )
