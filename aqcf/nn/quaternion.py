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

That dense path (``product="dense"``) costs what ``nn.Conv3d`` of the same real shape costs: 16 real
convolutions of ``C_in -> C_out`` channels. A quaternion product needs only 8 real multiplications
(Howell & Lafon 1975; Cariow & Cariowa, IEEE TNNLS 32(1), 2021), and because convolution is bilinear
the same algorithm turns ``W ⊗ x`` into 8 real convolutions (``product="fast"``). The one used here:
with the components numbered r=0, i=1, j=2, k=3, entry ``(n, m)`` of the matrix above is
``± W_{n xor m}``, so up to signs it is a dyadic convolution, which the 4×4 Walsh-Hadamard matrix
``H`` (rows ``(1,1,1,1), (1,-1,1,-1), (1,1,-1,-1), (1,-1,-1,1)``, ``H H = 4 I``) diagonalises:
``-H (H conj(W) ∘ H conj(x)) / 4 = sum_m conj(W)_{n xor m} (-conj(x))_m`` with
``conj(W) = (Wr, -Wi, -Wj, -Wk)``. Its signs agree with the matrix above in all but the four entries
``Wr xr, Wj xk, Wk xi, Wi xj`` (in rows r, i, j, k), which four more products correct::

    A = H conj(W):  A0 = Wr - Wi - Wj - Wk    X = H conj(x):  X0 = xr - xi - xj - xk
                    A1 = Wr + Wi - Wj + Wk                    X1 = xr + xi - xj + xk
                    A2 = Wr - Wi + Wj + Wk                    X2 = xr - xi + xj + xk
                    A3 = Wr + Wi + Wj - Wk                    X3 = xr + xi + xj - xk

    P_m = (-A_m / 4) * X_m      (m = 0..3, the dyadic part)
    P_4 = 2 Wr * xr,   P_5 = 2 Wj * xk,   P_6 = 2 Wk * xi,   P_7 = 2 Wi * xj   (the four corrections)

    yr = P0 + P1 + P2 + P3 + P4
    yi = P0 - P1 + P2 - P3 + P5
    yj = P0 + P1 - P2 - P3 + P6
    yk = P0 - P1 - P2 + P3 + P7

where ``*`` is the real convolution (or transposed convolution) of ``C_in -> C_out`` channels: one
grouped convolution with ``groups=8`` whose input stacks ``X0..X3, xr, xk, xi, xj`` and whose weight
stacks the 8 kernel combinations; the bias rides on the groups of ``P_4..P_7``. The factors ``-1/4``
and ``2`` are powers of two, so folding them into the kernels is exact. Expanding ``yi``, for example:
``P0 - P1 + P2 - P3 = Wi xr + Wr xi - Wk xj - Wj xk`` and ``P5 = 2 Wj xk`` give the eq. 2 row
``Wi xr + Wr xi - Wk xj + Wj xk``.

A *pointwise* layer (a 1×1×1 convolution at stride 1 without padding, or a transposed convolution
whose kernel equals its stride, without padding, output padding or dilation) is a matrix product per
voxel; there the 8 products are one batched matrix product (``torch.matmul`` of ``(8, C_out, C_in)``
by ``(B, 8, C_in, voxels)``) instead of the grouped convolution, which oneDNN runs up to several
times slower for these shapes, and a transposed layer then places each input voxel's
``kernel``-sized block of the output itself.

On a CPU the grouped convolution is slow at narrow widths and at widths that are no multiple of 16,
so ``product="auto"`` (the default) takes the fast path only where it was measured to win; see
:func:`resolve_product`.
"""

from __future__ import annotations

import functools
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
    "AUTO",
    "DENSE",
    "FAST",
    "PRODUCTS",
    "FAST_CHANNEL_MULTIPLE_CPU",
    "FAST_MIN_CHANNELS_CPU",
    "check_product",
    "resolve_product",
    "set_quaternion_product",
    "QuaternionConv3d",
    "QuaternionConvTranspose3d",
]

QUATERNION_COMPONENTS = 4
INIT_CRITERIA = ("he", "glorot")
_SPATIAL_DIMS = 3

AUTO = "auto"
DENSE = "dense"
FAST = "fast"
PRODUCTS = (AUTO, DENSE, FAST)
# 8 real convolutions of the fast path, one group each
_FAST_GROUPS = 8
# "auto" on a CPU takes the fast path where both quaternion widths are at least
# FAST_MIN_CHANNELS_CPU[kind] and, for the grouped convolution ("conv", "transposed"), multiples of
# FAST_CHANNEL_MULTIPLE_CPU. Measured with `python benchmarks/run.py --only quaternion` and probes
# (forward + backward; ratios fast / dense quaternion path) on the 2-core development CPU (Xeon,
# AVX-512), torch 2.13. Grouped convolution: 3x3x3 convs win from 32 channels (32->32: 0.62-0.76,
# 48->48: 0.51-0.65, 96->96: 0.41-0.55, 192->192: 0.36-0.40) but lose at widths that are no multiple
# of 16, whatever their size (24->24: 6.3-7.1, 36->36: 1.8, 40->40: 1.15-1.4, 56->56: 0.97-1.2; most
# likely oneDNN's fast grouped kernels want per-group channels in multiples of 16 floats, one AVX-512
# register), and 16->16 gains little (0.89-0.99); grouped transposed 2x2x2 convs won clearly only from
# 96 channels. Pointwise layers (a matrix product, module docstring): 1x1x1 convs win from 96
# channels (96->96: 0.62-0.86, 128->128: 0.55-0.57, 192->192: 0.52-0.61) and lose or tie below, not
# monotonically (48->48: 0.85-1.34, 64->64: 1.31-1.49, 24->24: 1.26-1.36); transposed 2x2x2 convs at
# stride 2 win from 24 channels whether or not they are multiples of 16 (48->24: 0.63-0.81, 32->32:
# 0.77, 96->48: 0.55-0.58, 256->96: 0.21) and tie below (24->12: 0.94-1.0, 16->16: 1.03-1.08).
FAST_CHANNEL_MULTIPLE_CPU = 16
FAST_MIN_CHANNELS_CPU = {"conv": 32, "transposed": 96, "pointwise": 96, "transposed pointwise": 24}


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


def check_product(product: str) -> str:
    """Return ``product`` if it is ``"auto"``, ``"dense"`` or ``"fast"``, else raise :class:`AqcfError`."""
    if product not in PRODUCTS:
        raise AqcfError(f"quaternion product={product!r}: expected one of {PRODUCTS}")
    return product


def resolve_product(
    product: str,
    q_in: int,
    q_out: int,
    kernel_size: int | Sequence[int],
    device: torch.device | str,
    transposed: bool = False,
    pointwise: bool = False,
) -> str:
    """The path a quaternion layer of ``q_in -> q_out`` quaternion channels takes on ``device``.

    ``"dense"`` and ``"fast"`` are returned as they are. ``"auto"`` gives ``"fast"`` on a CPU where it
    was measured to win: ``min(q_in, q_out)`` at least ``FAST_MIN_CHANNELS_CPU[kind]``. The kind is
    ``"pointwise"`` or ``"transposed pointwise"`` for a ``pointwise`` layer (one matrix product per
    voxel, module docstring), otherwise ``"conv"`` (a kernel of more than one voxel) or
    ``"transposed"``, run as a grouped convolution, which also needs both widths to be multiples of
    ``FAST_CHANNEL_MULTIPLE_CPU``. A one-voxel kernel that is not pointwise (strided or padded) stays
    dense. On every other device it gives ``"dense"``: on a GPU the two paths have not been measured,
    so the single ungrouped convolution is kept unless a user forces ``"fast"``.
    """
    product = check_product(product)
    if product != AUTO:
        return product
    one_voxel = math.prod(_triple(kernel_size)) == 1
    if torch.device(device).type != "cpu" or (one_voxel and not pointwise):
        return DENSE
    if pointwise:
        kind, blocked = ("transposed pointwise" if transposed else "pointwise"), True
    else:
        kind = "transposed" if transposed else "conv"
        blocked = q_in % FAST_CHANNEL_MULTIPLE_CPU == 0 and q_out % FAST_CHANNEL_MULTIPLE_CPU == 0
    return FAST if blocked and min(q_in, q_out) >= FAST_MIN_CHANNELS_CPU[kind] else DENSE


def set_quaternion_product(module: nn.Module, product: str) -> nn.Module:
    """Set ``product`` (``"auto"``, ``"dense"`` or ``"fast"``) on every quaternion convolution in ``module``.

    Returns:
        ``module`` itself; real layers are left as they are.
    """
    product = check_product(product)
    for layer in module.modules():
        if isinstance(layer, _QuaternionConvBase):
            layer.product = product
    return module


# The fast product's three constant matrices (module docstring), columns/rows in component order
# r, i, j, k. Applied by one matrix product each, rather than a dozen elementwise operations: on a
# loaded CPU every parallel elementwise kernel costs a scheduler time slice, whatever its size.
_FAST_KERNEL_MATRIX = (  # the 8 kernels from (Wr, Wi, Wj, Wk)
    (-0.25, 0.25, 0.25, 0.25),  # -A0/4
    (-0.25, -0.25, 0.25, -0.25),  # -A1/4
    (-0.25, 0.25, -0.25, -0.25),  # -A2/4
    (-0.25, -0.25, -0.25, 0.25),  # -A3/4
    (2.0, 0.0, 0.0, 0.0),  # 2Wr
    (0.0, 0.0, 2.0, 0.0),  # 2Wj
    (0.0, 0.0, 0.0, 2.0),  # 2Wk
    (0.0, 2.0, 0.0, 0.0),  # 2Wi
)
_FAST_INPUT_MATRIX = (  # the 8 inputs from (xr, xi, xj, xk)
    (1.0, -1.0, -1.0, -1.0),  # X0
    (1.0, 1.0, -1.0, 1.0),  # X1
    (1.0, -1.0, 1.0, 1.0),  # X2
    (1.0, 1.0, 1.0, -1.0),  # X3
    (1.0, 0.0, 0.0, 0.0),  # xr
    (0.0, 0.0, 0.0, 1.0),  # xk
    (0.0, 1.0, 0.0, 0.0),  # xi
    (0.0, 0.0, 1.0, 0.0),  # xj
)
_FAST_OUTPUT_MATRIX = (  # (yr, yi, yj, yk) from P0..P7: H on P0..P3, plus P4..P7
    (1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0),
    (1.0, -1.0, 1.0, -1.0, 0.0, 1.0, 0.0, 0.0),
    (1.0, 1.0, -1.0, -1.0, 0.0, 0.0, 1.0, 0.0),
    (1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 1.0),
)


@functools.cache
def _fast_matrix(rows: tuple[tuple[float, ...], ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(rows, dtype=dtype, device=device)


def _mix_blocks(rows: tuple[tuple[float, ...], ...], blocks: Tensor, dim: int) -> Tensor:
    """Linear combinations of the equal channel blocks of ``blocks`` along ``dim``, one per row of ``rows``.

    ``blocks`` has ``len(rows[0])`` blocks along ``dim``; the result has ``len(rows)`` blocks there,
    block ``m`` being ``sum_n rows[m][n] * block_n``.
    """
    matrix = _fast_matrix(rows, blocks.dtype, blocks.device)
    n_out, n_in = matrix.shape
    lead = blocks.shape[:dim]
    grouped = blocks.reshape(*lead, n_in, -1)
    mixed = torch.matmul(matrix, grouped)
    return mixed.reshape(*lead, n_out * blocks.shape[dim] // n_in, *blocks.shape[dim + 1 :])


def _fast_kernels(r: Tensor, i: Tensor, j: Tensor, k: Tensor) -> Tensor:
    """The 8 kernels ``-A0/4, -A1/4, -A2/4, -A3/4, 2Wr, 2Wj, 2Wk, 2Wi``.

    Args:
        r, i, j, k: sub-kernels ``(dim0, dim1, *kernel)``.

    Returns:
        ``(8 dim0, dim1, *kernel)``, the 8 kernels stacked along dim 0.
    """
    return _mix_blocks(_FAST_KERNEL_MATRIX, torch.cat([r, i, j, k]), dim=0)


def _fast_inputs(x: Tensor) -> Tensor:
    """``(B, 4C, ...)`` -> ``(B, 8C, ...)``: the 8 inputs ``X0, X1, X2, X3, xr, xk, xi, xj``."""
    check_quaternion_channels(x.shape[1], "input channels")
    return _mix_blocks(_FAST_INPUT_MATRIX, x, dim=1)


def _fast_outputs(products: Tensor) -> Tensor:
    """``(B, 8C, ...)`` holding ``P0..P7`` -> ``W ⊗ x``, ``(B, 4C, ...)``."""
    return _mix_blocks(_FAST_OUTPUT_MATRIX, products, dim=1)


def _pointwise_products(weight: Tensor, inputs: Tensor) -> Tensor:
    """The 8 products of a pointwise layer as one batched matrix product.

    Args:
        weight: ``(8, rows, C_in)``: per product, the ``rows`` values it gives each input voxel.
        inputs: the 8 inputs, ``(B, 8 C_in, *grid)``.

    Returns:
        ``(B, 8 rows, voxels)``, ``P0..P7`` as blocks along dim 1.
    """
    batch, groups, c_in = inputs.shape[0], weight.shape[0], weight.shape[2]
    products = torch.matmul(weight, inputs.reshape(batch, groups, c_in, -1))
    return products.reshape(batch, -1, products.shape[-1])


def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    # the bias rides on P4..P7, each of which enters one output component with factor 1; in y's dtype,
    # as a convolution under autocast adds it (a float32 bias would promote a bfloat16 output)
    return y if bias is None else y + bias.to(y.dtype).view(1, -1, *(1,) * (y.dim() - 2))


class _QuaternionConvBase(nn.Module):
    """Four sub-kernels ``r, i, j, k`` of shape ``(dim0, dim1, *kernel)`` and a real bias.

    ``(dim0, dim1)`` is ``(q_out, q_in)``, or ``(q_in, q_out)`` for a transposed convolution (the layout
    ``F.conv_transpose3d`` takes).
    """

    transposed = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        bias: bool,
        init: str,
        product: str,
    ) -> None:
        super().__init__()
        self.product = product
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.q_in = check_quaternion_channels(in_channels, "in_channels")
        self.q_out = check_quaternion_channels(out_channels, "out_channels")
        if init not in INIT_CRITERIA:
            raise AqcfError(f"init={init!r}: expected one of {INIT_CRITERIA}")
        self.init = init
        self.kernel_size = _triple(kernel_size)
        sub_kernel_dims = (self.q_in, self.q_out) if self.transposed else (self.q_out, self.q_in)
        shape = (*sub_kernel_dims, *self.kernel_size)
        self.r_weight = nn.Parameter(torch.empty(shape))
        self.i_weight = nn.Parameter(torch.empty(shape))
        self.j_weight = nn.Parameter(torch.empty(shape))
        self.k_weight = nn.Parameter(torch.empty(shape))
        # the bias acts on real channels, as in Parcollet et al.'s layers
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    @property
    def product(self) -> str:
        """``"auto"``, ``"dense"`` (one real convolution with the eq. 2 kernel) or ``"fast"`` (8 multiplications)."""
        return self._product

    @product.setter
    def product(self, product: str) -> None:
        self._product = check_product(product)
        # device type -> "dense" or "fast", decided once per device
        self._resolved: dict[str, str] = {}

    @property
    def pointwise(self) -> bool:
        """Whether each input voxel meets the kernel at one place only (module docstring): a matrix product."""
        return False

    def resolved_product(self, device: torch.device | str) -> str:
        """The path :meth:`forward` takes on ``device``: ``"dense"`` or ``"fast"`` (see :func:`resolve_product`)."""
        device_type = torch.device(device).type
        if device_type not in self._resolved:
            self._resolved[device_type] = resolve_product(
                self._product, self.q_in, self.q_out, self.kernel_size, device_type, self.transposed, self.pointwise
            )
        return self._resolved[device_type]

    def fast_weight(self) -> Tensor:
        """The 8 kernel combinations of the fast product, ``(8 dim0, dim1, *kernel_size)``."""
        return _fast_kernels(self.r_weight, self.i_weight, self.j_weight, self.k_weight)

    def fast_bias(self) -> Tensor | None:
        """The bias of the grouped convolution: zero on ``P0..P3``, the layer's bias on ``P4..P7``."""
        if self.bias is None:
            return None
        return torch.cat([torch.zeros_like(self.bias), self.bias])

    def _fans(self) -> tuple[float, float]:
        receptive = math.prod(self.kernel_size)
        return self.q_in * receptive, self.q_out * receptive

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, init={self.init!r}, product={self.product!r}"
        )

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
        product: ``"dense"`` (eq. 2 kernel, one convolution), ``"fast"`` (8 multiplications, one
            grouped convolution) or ``"auto"`` (:func:`resolve_product`); same parameters and result.

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
        product: str = AUTO,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias, init, product)
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

    @property
    def pointwise(self) -> bool:
        """A 1×1×1 kernel at stride 1 without padding."""
        return self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1) and self.padding == (0, 0, 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.resolved_product(x.device) == DENSE:
            return F.conv3d(x, self.real_weight(), self.bias, self.stride, self.padding, self.dilation)
        if self.pointwise:
            weight = self.fast_weight().reshape(_FAST_GROUPS, self.q_out, self.q_in)
            products = _pointwise_products(weight, _fast_inputs(x)).reshape(x.shape[0], -1, *x.shape[2:])
            return _add_bias(_fast_outputs(products), self.bias)
        weight, bias = self.fast_weight(), self.fast_bias()
        products = F.conv3d(_fast_inputs(x), weight, bias, self.stride, self.padding, self.dilation, _FAST_GROUPS)
        return _fast_outputs(products)


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
        product: ``"dense"``, ``"fast"`` or ``"auto"``, as :class:`QuaternionConv3d`.

    Shapes:
        input ``(B, in_channels, X, Y, Z)`` -> output ``(B, out_channels, X', Y', Z')`` with
        ``X' = (X - 1) stride - 2 padding + dilation (kernel - 1) + output_padding + 1``.
    """

    transposed = True

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
        product: str = AUTO,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias, init, product)
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

    @property
    def pointwise(self) -> bool:
        """A kernel equal to the stride, without padding, output padding or dilation: the blocks tile the output."""
        none = (0, 0, 0)
        plain = self.padding == none and self.output_padding == none and self.dilation == (1, 1, 1)
        return plain and self.kernel_size == self.stride

    def _pointwise_forward(self, x: Tensor) -> Tensor:
        batch, (gx, gy, gz), (kx, ky, kz) = x.shape[0], x.shape[2:], self.kernel_size
        # (8 q_in, q_out, *kernel) -> (8, q_out kx ky kz, q_in): each input voxel's output block per product
        weight = self.fast_weight().reshape(_FAST_GROUPS, self.q_in, -1).transpose(1, 2)
        # mixed before the blocks are placed: half the data to move
        y = _fast_outputs(_pointwise_products(weight, _fast_inputs(x)))
        y = y.reshape(batch, self.out_channels, kx, ky, kz, gx, gy, gz).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return _add_bias(y.reshape(batch, self.out_channels, gx * kx, gy * ky, gz * kz), self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.resolved_product(x.device) == DENSE:
            return F.conv_transpose3d(
                x, self.real_weight(), self.bias, self.stride, self.padding, self.output_padding, 1, self.dilation
            )
        if self.pointwise:
            return self._pointwise_forward(x)
        # the grouped weight is (8 q_in, q_out, ...): each group's (in, out) block is a plain sub-kernel
        # combination, so no transposition is involved and the product stays W ⊗ x
        products = F.conv_transpose3d(
            _fast_inputs(x),
            self.fast_weight(),
            self.fast_bias(),
            self.stride,
            self.padding,
            self.output_padding,
            _FAST_GROUPS,
            self.dilation,
        )
        return _fast_outputs(products)
