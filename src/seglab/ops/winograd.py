"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3), F(3x3, 3x3), F(4x4, 3x3) and
F(6x6, 3x3)
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).

An m x m tile of a 3x3 convolution's output depends on an (m + 2) x (m + 2) tile `d` of its
input. Computed directly it takes 9 m^2 multiply-adds per pair of input and output channels;
Winograd transforms the input tile (`B^T d B`) and the filter `g` (`G g G^T`, once) into
(m + 2) x (m + 2) tiles whose elementwise product, transformed back (`A^T (.) A`), is the output
tile: (m + 2)^2 products. Summed over the input channels, the elementwise products become
(m + 2)^2 independent matrix products, [tiles x C_in] @ [C_in x C_out], which a BLAS runs at full
speed. The transforms cost a constant per channel, the products one per pair of channels, so
the method pays where channels are many.

- F(2x2, 3x3): 16 products per 4 outputs, 2.25x fewer multiply-adds than the direct
  convolution; its matrices hold only 0, +-1 and +-1/2.
- F(3x3, 3x3): 25 products per 9 outputs, 3.24x fewer: for the 2-3-pixel phases of a
  large-dilation convolution (`seglab.engine.winograd.atrous_output_tile`), which F(4x4)'s
  tiles would overhang.
- F(4x4, 3x3): 36 products per 16 outputs, 4x fewer.
- F(6x6, 3x3): 64 per 36, 5.06x fewer; and an input tile of 8 x 8 per 36 outputs instead of
  6 x 6 per 16, so 21% less data through the transforms per output. Its tiles are coarser:
  a 32 x 32 map takes 6 x 6 of them (36 x 36 outputs, 27% wasted) where F(4x4) wastes none.

The matrices come from the Toom-Cook construction (`_toom_cook`): the transpose of
multiplying two polynomials by evaluating them at m + 1 points and infinity. At the paper's
points (0, +-1 for F(2x2); +-2 added for F(4x4); +-1/2 for F(6x6)) it gives the paper's
matrices; F(3x3) takes 0, +-1 and 2.

The transforms run as PyTorch operators, or, on the CPU where a C compiler built them, as
native kernels that make one pass over memory each (`seglab.ops.native`).

The price is precision: the transforms' coefficients (up to 8 in F(4x4)'s `A`, 32 in F(6x6)'s)
cost a few bits, about 6e-6 of the largest output on random float32 data with F(4x4) and 1e-5
with F(6x6), against ~1e-6 for a direct convolution. So F(4x4) and F(6x6) serve float32, where
those bits are spare: with their products in bfloat16 the error reached 0.08-0.2 of the largest
output. F(2x2)'s transforms add at most four values, so it also serves bfloat16 inference and
training (`winograd_conv3x3` given bf16 input and filters): float32 transforms around bf16
products, an error about 2x (largest) to 3.5x (mean) a direct bf16 convolution's on random
data, the gradients' 1.4-2x (`_NativeF2x2`).
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from seglab.ops import native
from seglab.ops.grad_mode import records_gradients
from seglab.ops.layout import channel_sums
from seglab.ops.tracing import being_traced

__all__ = ["BF16_TILE", "MAX_FUSED_CHANNEL_PRODUCT", "OUTPUT_TILES", "TILE", "fuses", "input_matrix", "input_tiles",
           "output_map", "runs_natively", "tile_of", "transformed_windows", "winograd_conv3x3", "winograd_filters"]

TILE = 4  # the default output tile side: F(4x4, 3x3)
BF16_TILE = 2  # the one tile whose transforms bf16 products survive
# C_in x C_out up to which F(4x4) runs in one native pass where no gradient is needed (`fuses`)
MAX_FUSED_CHANNEL_PRODUCT = 128 * 64
# Output tile side -> interpolation points (infinity is the last, implied).
_POINTS = {
    2: (0, 1, -1),
    3: (0, 1, -1, 2),
    4: (0, 1, -1, 2, -2),
    6: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2)),
}
OUTPUT_TILES = tuple(_POINTS)


class _Matrices(NamedTuple):
    b_t: torch.Tensor  # (m + 2) x (m + 2): input tile -> Winograd domain
    g_kron_g: torch.Tensor  # (m + 2)^2 x 9: row (m + 2) i + l, column 3 j + k: G[i, j] G[l, k]
    a_t: torch.Tensor  # m x (m + 2): Winograd domain -> output tile


def _inverse(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
    """The exact inverse of a square matrix of fractions (Gauss-Jordan)."""
    n = len(matrix)
    rows = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [v / rows[col][col] for v in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                rows[r] = [a - rows[r][col] * b for a, b in zip(rows[r], rows[col])]
    return [row[n:] for row in rows]


def _toom_cook(points: tuple) -> tuple[list[list[Fraction]], list[list[Fraction]], list[list[Fraction]]]:
    """(B^T, G, A^T) of F(m x m, 3x3) for m + 1 finite points (infinity is added), exactly.

    Multiplying a polynomial g of 3 coefficients with one h of m: evaluate both at the points
    (V_g g, V_h h; at infinity the leading coefficient), multiply, interpolate the product's
    m + 2 coefficients (V^-1). The correlation the convolution layer computes is that linear
    map's transpose in h: y = V_h^T [(V_g g) . (V^-T d)]. Scaling row j of V^-T by
    f_j = prod_(l != j) (a_j - a_l) and row j of V_g by 1 / f_j keeps B^T's entries small."""
    points = tuple(Fraction(p) for p in points)
    size = len(points) + 1

    def vandermonde(columns: int) -> list[list[Fraction]]:
        rows = [[p**k for k in range(columns)] for p in points]
        return rows + [[Fraction(int(k == columns - 1)) for k in range(columns)]]

    scale = [math.prod((p - q for q in points if q != p), start=Fraction(1)) for p in points] + [Fraction(1)]
    v_inverse = _inverse(vandermonde(size))
    b_t = [[scale[j] * v_inverse[i][j] for i in range(size)] for j in range(size)]
    g = [[value / scale[j] for value in row] for j, row in enumerate(vandermonde(3))]
    a_t = [list(column) for column in zip(*vandermonde(size - 2))]
    return b_t, g, a_t


@functools.cache
def _matrices(tile: int) -> _Matrices:
    """The cached float64 matrices of F(tile x tile, 3x3), built outside inference mode: made
    by a first call under `torch.inference_mode` they would be inference tensors, which a later
    float64 training call (where `.to` returns them as they are) could not save for backward."""
    if tile not in _POINTS:
        sides = ", ".join(map(str, OUTPUT_TILES[:-1])) + f" or {OUTPUT_TILES[-1]}"
        raise ValueError(f"Winograd output tiles are {sides} wide, not {tile}")
    with torch.inference_mode(False):
        b_t, g, a_t = (torch.tensor([[float(v) for v in row] for row in matrix], dtype=torch.float64)
                       for matrix in _toom_cook(_POINTS[tile]))
        return _Matrices(b_t, torch.kron(g, g), a_t)


def tile_of(filters: torch.Tensor) -> int:
    """The output tile side of filters in Winograd's domain ((m + 2)^2 x C_in x C_out)."""
    side = math.isqrt(filters.shape[0])
    if side * side != filters.shape[0] or side - 2 not in _POINTS:
        raise ValueError(f"filters of shape {tuple(filters.shape)} are not in Winograd's domain")
    return side - 2


def winograd_filters(weight: torch.Tensor, tile: int = TILE, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 3x3 filters `weight` (C_out x C_in x 3 x 3) in the Winograd domain of F(tile x tile,
    3x3), `G g G^T`, laid out as the (tile + 2)^2 matrices the products take:
    (tile + 2)^2 x C_in x C_out, in `dtype` (default the weight's; bf16 filters of a float32
    weight are those of the weight cast to bf16, as autocast casts it). Differentiable.

    A float32 CPU weight (to float32 filters, or F(2x2)'s bf16 ones) takes the native transform
    (`native.winograd_filters`), one pass each way with the same bits as the operators below
    (the backward by it for F(2x2) only, whose sums of taps times 0, +-1/4, +-1/2 and +-1 are
    exact; the larger tiles' backward keeps the transposed product, whose order of summing the
    native pass did not match)."""
    dtype = dtype or weight.dtype
    if (weight.device.type == "cpu" and weight.dtype == torch.float32
            and (dtype == torch.float32 or (dtype == torch.bfloat16 and tile == BF16_TILE))
            and native.available() and not being_traced()):
        return _NativeFilters.apply(weight, tile, dtype == torch.bfloat16)
    return _filters_by_products(weight.to(dtype), tile)


def _filters_by_products(weight: torch.Tensor, tile: int) -> torch.Tensor:
    out_channels, in_channels, kh, kw = weight.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"Winograd F(m x m, 3x3) takes 3x3 filters, not {kh}x{kw}")
    g_kron_g = _matrices(tile).g_kron_g
    # At least float32, not float64 for float32 weights, so that training's backward through
    # it stays cheap: G's rounding (1/6, 1/24) is ~1e-7, far below the method's own.
    dtype = torch.promote_types(weight.dtype, torch.float32)
    # G g G^T for all filters at once: the (m + 2)^2 x 9 Kronecker product of G with itself times
    # the filters laid out tap by tap (9 x (C_in C_out), a copy of the small weight), which writes
    # the matrices in place. An einsum of the two products took 3x as long forward and
    # backward (256 x 768 filters: 70 against 24 ms), in copies of its large intermediate.
    taps = weight.to(dtype).permute(2, 3, 1, 0).reshape(9, in_channels * out_channels)
    transformed = g_kron_g.to(weight.device, dtype) @ taps
    return transformed.view(g_kron_g.shape[0], in_channels, out_channels).to(weight.dtype)


@functools.cache
def _float_matrix(tile: int) -> torch.Tensor:
    """F(tile x tile)'s (tile + 2)^2 x 9 filter matrix in float32 for the native transform, built
    outside inference mode like `_matrices`."""
    with torch.inference_mode(False):
        return _matrices(tile).g_kron_g.float().contiguous()


class _NativeFilters(torch.autograd.Function):
    """`_filters_by_products` of a float32 weight (cast to bf16 first with `bf16`) by the native
    transform, each way one pass in place of the operators' copies, products and casts: a
    channels-last 256 -> 256 weight to bf16 F(2x2) filters and back in 1.2-1.7 ms against
    2.4-3.2 (Zen 4, 2 threads); a bf16 UNet-R34 training step, thirteen of them, 1.02x."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, tile: int, bf16: bool) -> torch.Tensor:
        if weight.dim() != 4 or weight.shape[2:] != (3, 3):
            raise ValueError(f"Winograd F(m x m, 3x3) takes C_out x C_in x 3 x 3 filters, not of shape {tuple(weight.shape)}")
        ctx.tile, ctx.weight_layout = tile, (weight.shape, weight.stride())
        return native.winograd_filters(weight, _float_matrix(tile), bf16=bf16)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        shape, strides = ctx.weight_layout
        gradient = torch.empty_strided(shape, strides)  # in the weight's layout, as autograd would give it
        matrix = _float_matrix(ctx.tile)
        if ctx.tile == 2:
            return native.winograd_filters_backward(grad.contiguous(), matrix, gradient), None, None
        # The operators' own backward: the product's transpose, then the taps back in place.
        taps = matrix.t().mm(grad.reshape(matrix.shape[0], -1))
        return gradient.copy_(taps.view(3, 3, shape[1], shape[0]).permute(3, 2, 0, 1)), None, None


def _transform(matrix: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """`matrix @ tile @ matrix^T` for every tile of `tiles` (n x n x rest, the tile's two axes
    first): one product along each axis. Separable, it takes 2n multiply-adds per output
    element where the Kronecker product of the matrix with itself would take n^2."""
    n, rest = tiles.shape[0], tiles.shape[2:]
    rows = (matrix @ tiles.reshape(n, -1)).view(matrix.shape[0], n, -1)
    return (matrix @ rows).view(matrix.shape[0], matrix.shape[0], *rest)


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None = None,
                     dilation: int = 1, *, residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """The stride-1 3x3 convolution of `x` (N x C_in x H x W) with zero padding `dilation` (the
    size-preserving one) at `dilation`, given its filters in Winograd's domain
    (`winograd_filters`; their size picks F(2x2, 3x3), F(4x4, 3x3) or F(6x6, 3x3)), plus `bias`,
    plus `residual` (N x C_out x H x W) when given, then the ReLU with `relu`. Returns
    N x C_out x H x W in the channels-last layout, in `x`'s dtype. The transforms run in at
    least float32 and the products in the filters' dtype: bf16 `x` and filters give bf16
    products between float32 transforms (with F(2x2) only: see above). Differentiable; where no
    gradient is needed the residual and the ReLU are added by the output transform's own pass
    (`_epilogue_in_transform`), and float32 F(4x4) of few channels runs as one pass (`fuses`)."""
    n, in_channels, height, width = x.shape
    tile = tile_of(filters)
    if filters.shape[1] != in_channels:
        raise ValueError(f"filters of shape {tuple(filters.shape)} do not take {in_channels} input channels")
    nhwc = x.permute(0, 2, 3, 1)
    if (tile == TILE and fuses(in_channels, filters.shape[-1], dilation) and runs_natively(nhwc, filters)
            and nhwc.dtype == torch.float32 and not records_gradients(x, filters, bias, residual)
            and _residual_fits(nhwc, filters, residual)):
        return _fused(nhwc.contiguous(), filters, bias, residual, relu).permute(0, 3, 1, 2)
    if residual is not None or relu:
        if _epilogue_in_transform(nhwc, filters, bias, residual):
            fused = _natively(nhwc.contiguous(), filters, bias, dilation, epilogue=(
                None if residual is None else residual.permute(0, 2, 3, 1), relu))
            return fused.permute(0, 3, 1, 2)
        out = winograd_conv3x3(x, filters, bias, dilation)  # a fresh map: in place is safe
        if residual is not None:
            out += residual
        return out.relu_() if relu else out
    if runs_natively(nhwc, filters):
        # At dilation d the kernels gather each phase's windows and write each phase's outputs
        # in place (`native.gather_tiles`).
        return _natively(nhwc.contiguous(), filters, bias, dilation).permute(0, 3, 1, 2)
    if dilation > 1:
        # A convolution at dilation d is d x d undilated ones, each over one phase of the map
        # (the pixels (i, j) with the same i mod d and j mod d) stacked along the batch. Zeros
        # appended to a whole number of phase pixels are the padding the edge taps read anyway.
        rows, cols = -(-height // dilation), -(-width // dilation)
        nhwc = F.pad(nhwc, (0, 0, 0, cols * dilation - width, 0, rows * dilation - height))
        phases = nhwc.view(n, rows, dilation, cols, dilation, in_channels).permute(0, 2, 4, 1, 3, 5)
        out = _undilated(phases.reshape(n * dilation * dilation, rows, cols, in_channels), filters)
        out = out.view(n, dilation, dilation, rows, cols, -1).permute(0, 3, 1, 4, 2, 5)
        out = out.reshape(n, rows * dilation, cols * dilation, -1)[:, :height, :width]
    else:
        out = _undilated(nhwc, filters)
    out = out.contiguous()
    if bias is not None:
        out += bias
    return out.permute(0, 3, 1, 2)


class _InputTiles(torch.autograd.Function):
    """The overlapping (m + 2) x (m + 2) tiles at a stride of m of a padded N x H x W x C map,
    tile axes first: (m + 2) x (m + 2) x (N rows cols) x C. Its gradient adds each tile's two
    overlapping rows and columns onto its neighbour's with whole-slice additions; autograd's
    gradient of `unfold` (a generic scatter) took 4x as long (63 against 15 ms, forward and
    backward, for 64 channels on 128 x 128 at batch 4, m = 4)."""

    @staticmethod
    def forward(ctx: Any, padded: torch.Tensor, tile: int = TILE) -> torch.Tensor:
        n, height, width, channels = padded.shape
        rows, cols = (height - 2) // tile, (width - 2) // tile
        ctx.dims = (n, rows, cols, channels, tile)
        tiles = padded.unfold(1, tile + 2, tile).unfold(2, tile + 2, tile).permute(4, 5, 0, 1, 2, 3)
        return tiles.reshape(tile + 2, tile + 2, n * rows * cols, channels)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        n, rows, cols, channels, tile = ctx.dims
        overlap = slice(tile, tile + 2)
        # Columns: tile column j of tile c lands on map column m c + j; j = m, m + 1 are the next
        # tile's 0, 1. Blocks of m columns, one more than the tiles for the last overlap.
        per_row = grad.reshape(tile + 2, tile + 2, n, rows, cols, channels).permute(0, 2, 3, 4, 1, 5)
        blocks = grad.new_empty(tile + 2, n, rows, cols + 1, tile, channels)
        blocks[:, :, :, :cols] = per_row[..., :tile, :]
        blocks[:, :, :, cols, :2] = 0
        blocks[:, :, :, 1:, :2] += per_row[..., overlap, :]
        width = tile * cols + 2
        by_row = blocks.view(tile + 2, n, rows, tile * (cols + 1), channels)[:, :, :, :width].permute(1, 2, 0, 3, 4)
        # Rows likewise.
        out = grad.new_empty(n, rows + 1, tile, width, channels)
        out[:, :rows] = by_row[:, :, :tile]
        out[:, rows, :2] = 0
        out[:, 1:, :2] += by_row[:, :, overlap]
        return out.view(n, tile * (rows + 1), width, channels)[:, :tile * rows + 2], None


def _undilated(nhwc: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """The undilated 3x3 convolution, zero padding 1, of the channels-last map `nhwc`
    (N x H x W x C_in) by PyTorch's operators: N x H x W x C_out, not necessarily contiguous."""
    n, height, width, in_channels = nhwc.shape
    out_channels, tile = filters.shape[-1], tile_of(filters)
    side = tile + 2
    b_t, _, a_t = _matrices(tile)
    work = torch.promote_types(nhwc.dtype, torch.float32)  # the transforms' dtype (bf16 has no bits to spare)
    rows, cols = -(-height // tile), -(-width // tile)
    # Zero-pad to whole tiles plus the filter's border.
    padded = F.pad(nhwc.to(work), (0, 0, 1, cols * tile + 1 - width, 1, rows * tile + 1 - height))
    count = n * rows * cols
    inputs = _transform(b_t.to(nhwc.device, work), _InputTiles.apply(padded, tile))
    products = torch.bmm(inputs.view(side * side, count, in_channels).to(filters.dtype), filters)
    outputs = _transform(a_t.to(nhwc.device, work), products.view(side, side, count, out_channels).to(work))
    # m x m x N x rows x cols x C_out -> N x (rows, m) x (cols, m) x C_out
    outputs = outputs.view(tile, tile, n, rows, cols, out_channels).permute(2, 3, 0, 4, 1, 5)
    return outputs.reshape(n, rows * tile, cols * tile, out_channels)[:, :height, :width].to(nhwc.dtype)


# The same convolution with each transform in one pass over memory (`seglab.ops.native`):
# PyTorch's operators took 5-7 (the padding, the windows' copy, a product per axis, the layout
# copies, the bias). On the CPU, float32 (or bf16: float32 transforms, bf16 products) only;
# elsewhere, or without a C compiler, `_undilated` runs the operators above.


def runs_natively(nhwc: torch.Tensor, filters: torch.Tensor) -> bool:
    return (nhwc.device.type == "cpu" and nhwc.dtype in (torch.float32, torch.bfloat16)
            and filters.dtype == nhwc.dtype and native.available())


@functools.cache
def _native_matrices(tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """F(tile x tile)'s B^T and A^T in float32 for the native kernels, and their transposes
    (the gradients' matrices), built outside inference mode like `_matrices`."""
    with torch.inference_mode(False):
        b_t, _, a_t = (m.float() for m in _matrices(tile))
        return b_t.contiguous(), b_t.t().contiguous(), a_t.contiguous(), a_t.t().contiguous()


def _native_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A bias as the native kernels add it: float32, contiguous, outside autograd (their own
    backward, where they have one, returns its gradient)."""
    return None if bias is None else bias.detach().float().contiguous()


def _register_native_matrices() -> None:
    """Winograd's four matrices per tile, compiled into the native kernels (`native.specialise`)."""
    gathers, scatters = [], []
    for tile in OUTPUT_TILES:
        b_t, b, a_t, a = _native_matrices(tile)
        gathers += [b_t, a]  # the input transform; the output transform's gradient
        scatters += [a_t, b]  # the output transform; the input transform's gradient
    b_t, _, a_t, _ = _native_matrices(TILE)
    native.specialise(gathers=tuple(gathers), scatters=tuple(scatters), fused=(b_t, a_t))


_register_native_matrices()


class _NativeInputTransform(torch.autograd.Function):
    """N x H x W x C_in (contiguous) -> side^2 x tiles x C_in: `L d L^T` of every window `d` at
    a stride of `step`, zero padding 1, `L` = `matrix` (side x the window's side): `B^T` and
    the tile for Winograd's input tiles (`input_tiles`), `B^T` times nearest upsampling for
    those of an upsampled map (`seglab.ops.winograd_nearest`). In the map's dtype (float32, or
    bf16 transformed in float32). The gradient adds `L^T g L` of each tile back onto its
    (overlapping) window, in float32; `gradient_matrix` is `L^T`, contiguous. With `dilation`
    d, the windows of each of the map's d x d phases (`native.gather_tiles`)."""

    @staticmethod
    def forward(ctx: Any, nhwc: torch.Tensor, matrix: torch.Tensor, gradient_matrix: torch.Tensor,
                step: int, dilation: int = 1) -> torch.Tensor:
        ctx.shape, ctx.dtype, ctx.gradient_matrix, ctx.step = tuple(nhwc.shape), nhwc.dtype, gradient_matrix, step
        ctx.dilation = dilation
        return native.gather_tiles(nhwc, matrix, step=step, pad=1, dilation=dilation)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        n, height, width, _ = ctx.shape
        out = grad.new_zeros(ctx.shape, dtype=torch.float32)
        native.scatter_tiles(grad.float().contiguous(), ctx.gradient_matrix, (n, height, width), step=ctx.step,
                             pad=1, accumulate_into=out, dilation=ctx.dilation)
        return out.to(ctx.dtype), None, None, None, None


def transformed_windows(nhwc: torch.Tensor, matrix: torch.Tensor, gradient_matrix: torch.Tensor,
                        step: int, dilation: int = 1) -> torch.Tensor:
    """`L d L^T` of every window `d` of the channels-last map `nhwc` (N x H x W x C,
    contiguous) at a stride of `step`, zero padding 1 (with `dilation` d, the windows of each
    of the map's d x d phases), in the layout of the batched products; differentiable
    (`_NativeInputTransform`). `matrix` is L (float32, contiguous, registered with
    `native.specialise` to run at full speed) and `gradient_matrix` its transpose."""
    return _NativeInputTransform.apply(nhwc, matrix, gradient_matrix, step, dilation)


def input_matrix(tile: int) -> torch.Tensor:
    """F(tile x tile)'s input transform `B^T`, float64 ((tile + 2) x (tile + 2))."""
    return _matrices(tile).b_t


def input_tiles(nhwc: torch.Tensor, tile: int, dilation: int = 1) -> torch.Tensor:
    """Winograd's input tiles of F(tile x tile) by the native kernels (`transformed_windows`),
    those of a `dilation`-dilated convolution (all phases') with dilation > 1."""
    b_t, b, _, _ = _native_matrices(tile)
    return transformed_windows(nhwc, b_t, b, tile, dilation)


class _NativeOutputTransform(torch.autograd.Function):
    """(m + 2)^2 x tiles x C_out -> N x H x W x C_out (contiguous): `A^T M A` of every tile,
    cropped to the map, plus the bias, in the products' dtype (float32, or bf16 transformed in
    float32). The gradient takes `A g A^T` of each output tile, in float32. With `dilation` d
    the tiles are those of the map's d x d phases, each output written in place."""

    @staticmethod
    def forward(ctx: Any, products: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, int, int],
                tile: int, dilation: int = 1) -> torch.Tensor:
        ctx.tile, ctx.has_bias, ctx.dtype, ctx.dilation = tile, bias is not None, products.dtype, dilation
        return native.scatter_tiles(products, _native_matrices(tile)[2], shape, step=tile, pad=0,
                                    bias=_native_bias(bias),
                                    dilation=dilation)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None, None, None]:
        grad = grad.float().contiguous()
        products = native.gather_tiles(grad, _native_matrices(ctx.tile)[3], step=ctx.tile, pad=0,
                                       dilation=ctx.dilation)
        bias = channel_sums(grad.permute(0, 3, 1, 2)) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return products.to(ctx.dtype), bias, None, None, None


def winograd_weight_gradient(nhwc: torch.Tensor, grad_nhwc: torch.Tensor, tile: int, dilation: int = 1) -> torch.Tensor:
    """The weight's gradient (C_out x C_in x 3 x 3, float32) of the stride-1, "same"-padded 3x3
    convolution at `dilation` of `nhwc` (N x H x W x C_in) whose output has the gradient
    `grad_nhwc` (N x H x W x C_out), both float32, channels-last, contiguous: what
    `winograd_conv3x3`'s backward gives its filters, without its forward. The input tiles
    (`B^T d B`) and the output transform's gradient (`A g A^T`) by the native kernels, their
    (m + 2)^2 products summed over the tiles (C_in x tiles by tiles x C_out), then `G^T . G`
    back to 3 x 3 taps. For a convolution whose forward ran otherwise (the int8 windows of
    `seglab.ops.atrous_gemm`) where Winograd's domain has fewer products to sum."""
    b_t, _, _, a = _native_matrices(tile)
    tiles = native.gather_tiles(nhwc, b_t, step=tile, pad=1, dilation=dilation)  # (m + 2)^2 x tiles x C_in
    grad_products = native.gather_tiles(grad_nhwc, a, step=tile, pad=0, dilation=dilation)  # ... x C_out
    grad_filters = torch.bmm(tiles.transpose(1, 2), grad_products)  # (m + 2)^2 x C_in x C_out
    g_kron_g = _matrices(tile).g_kron_g.to(grad_filters.device, grad_filters.dtype)
    taps = g_kron_g.t() @ grad_filters.view(g_kron_g.shape[0], -1)  # the adjoint of `winograd_filters`
    return taps.view(3, 3, nhwc.shape[-1], grad_nhwc.shape[-1]).permute(3, 2, 0, 1)


def output_map(products: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, int, int],
               tile: int, dilation: int = 1) -> torch.Tensor:
    """The N x H x W x C_out map (`shape` = (N, H, W)) of F(tile x tile)'s products ((tile +
    2)^2 x tiles x C_out; with `dilation` d, those of the map's d x d phases) by the native
    kernels, plus `bias`; differentiable (`_NativeOutputTransform`)."""
    return _NativeOutputTransform.apply(products, bias, shape, tile, dilation)


@functools.cache
def _flip(tile: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The signed permutation (index, sign) of the (m + 2)^2 positions that takes a filter's
    Winograd-domain form to its 180-degree rotation's, `G flip(g) G^T`, where one exists: for
    F(2x2, 3x3), whose points 0 and infinity trade places under the rotation and +-1 keep
    theirs. (F(4x4)'s +-2 would become +-1/2: no permutation.)"""
    g_kron_g = _matrices(tile).g_kron_g
    rotated = g_kron_g @ torch.eye(9, dtype=torch.float64).flip(0)  # row p: G flip(g) G^T at p, by tap
    index, sign = [], []
    for row in rotated:
        matches = [(q, s) for q in range(len(g_kron_g)) for s in (1.0, -1.0) if torch.equal(s * g_kron_g[q], row)]
        if not matches:
            return None
        index.append(matches[0][0])
        sign.append(matches[0][1])
    with torch.inference_mode(False):  # cached: as `_matrices`
        return torch.tensor(index), torch.tensor(sign, dtype=torch.float32)


def _input_gradient_filters(filters: torch.Tensor) -> torch.Tensor:
    """The Winograd-domain filters of a convolution's input gradient, the convolution of the
    output gradient with the rotated, transposed kernel (C_out in, C_in out), made from
    `filters` by `_flip`'s signed permutation: exact in any dtype. A transposed view: the
    batched product reads it as it lies, with the same bits as from a contiguous copy, and
    the copy took 0.4 ms of each 256 -> 256 bf16 convolution's backward (Zen 4)."""
    index, sign = _flip(tile_of(filters))
    rotated = filters[index.to(filters.device)] * sign.to(filters.device, filters.dtype).view(-1, 1, 1)
    return rotated.transpose(1, 2)


class _NativeF2x2(torch.autograd.Function):
    """F(2x2, 3x3) in one function, forward and backward, in the map's dtype (float32, or bf16:
    transforms in float32 between bf16 reads and writes, bf16 products; seglab's bf16 training).

    Forward: input tiles `V = B^T d B`, products `M = V F`, output `A^T M A` (+ bias). Backward:
    the filters' gradient `V^T (A dY A^T)`, from the saved tiles; the input's as a forward
    convolution of the output gradient with the rotated, transposed filters (`_flip`), by the
    forward's own kernels. Autograd through the three steps (`input_tiles`, `bmm`,
    `_NativeOutputTransform`) adds the input tiles' gradient back onto the overlapping windows
    instead, rounding a bf16 pixel up to four times (or taking float32 copies); this way each
    gradient is rounded once, like the forward's output. Against oneDNN's bf16 direct
    convolution, forward and both gradients, batch 4, interleaved medians on an AVX-512 BF16
    Zen 4 (`seglab.engine.winograd` has the rule): 256 ch on 32 x 32 1.44x, on 64 x 64 1.54x;
    512 ch on 32 x 32 1.55x; 1024 -> 512 on 64 x 64 1.89x; the gradients' error on random data
    1.4-2x the direct convolution's (as the forward's)."""

    @staticmethod
    def forward(ctx: Any, nhwc: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None,
                dilation: int = 1) -> torch.Tensor:
        n, height, width, _ = nhwc.shape
        b_t, _, a_t, _ = _native_matrices(BF16_TILE)
        inputs = native.gather_tiles(nhwc, b_t, step=BF16_TILE, pad=1, dilation=dilation)
        ctx.save_for_backward(inputs, filters)
        ctx.shape, ctx.has_bias, ctx.dilation = (n, height, width), bias is not None, dilation
        return native.scatter_tiles(torch.bmm(inputs, filters), a_t, ctx.shape, step=BF16_TILE, pad=0,
                                    bias=_native_bias(bias),
                                    dilation=dilation)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        inputs, filters = ctx.saved_tensors
        b_t, _, a_t, a = _native_matrices(BF16_TILE)
        grad = grad.to(inputs.dtype).contiguous()
        grad_input = grad_filters = grad_bias = None
        phases = dict(dilation=ctx.dilation)
        if ctx.needs_input_grad[1]:
            products = native.gather_tiles(grad, a, step=BF16_TILE, pad=0, **phases)  # A dY A^T
            grad_filters = torch.bmm(inputs.transpose(1, 2), products)
        if ctx.needs_input_grad[0]:
            tiles = native.gather_tiles(grad, b_t, step=BF16_TILE, pad=1, **phases)
            grad_input = native.scatter_tiles(torch.bmm(tiles, _input_gradient_filters(filters)), a_t, ctx.shape,
                                              step=BF16_TILE, pad=0, **phases)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = channel_sums(grad.permute(0, 3, 1, 2))
        return grad_input, grad_filters, grad_bias, None


def fuses(in_channels: int, out_channels: int, dilation: int) -> bool:
    """Whether a float32 F(4x4) convolution of these channels runs as one native pass where no
    gradient is needed (`native.winograd_fused`: transforms and products per group of tiles,
    nothing of the tiles' size through memory), the undilated ones of few channels: up to
    `MAX_FUSED_CHANNEL_PRODUCT` for C_in x C_out, there faster than the separate passes. Xeon
    with AVX-512, 2 threads, interleaved (`python benchmarks/winograd.py`), direct / one pass
    against direct / separate passes: 32 -> 32 channels on 256 x 256 1.72x against 1.04x,
    64 -> 32 1.65x against 0.98x, 128 -> 64 on 128 x 128 1.97x against 1.62x, 64 -> 64 2.04x
    against 1.48x (batch 8 2.02x against 1.24x); 128 -> 128 on 64 x 64 1.62-1.78x against
    2.19-2.20x, where the separate passes' batched products win."""
    return (dilation == 1 and out_channels % native.FUSED_CHANNELS_MULTIPLE == 0
            and in_channels * out_channels <= MAX_FUSED_CHANNEL_PRODUCT)


def _fused(nhwc: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
           relu: bool) -> torch.Tensor:
    """The convolution by `native.winograd_fused` (`fuses`): N x H x W x C_out, contiguous."""
    b_t, _, a_t, _ = _native_matrices(TILE)
    return native.winograd_fused(nhwc, filters.contiguous(), b_t, a_t,
                                 bias=_native_bias(bias),
                                 residual=None if residual is None else residual.permute(0, 2, 3, 1),
                                 relu=relu)


def _epilogue_in_transform(nhwc: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None,
                           residual: torch.Tensor | None) -> bool:
    """Whether the output transform can add `residual` (N x C_out x H x W) and apply the ReLU
    itself: the native kernels, no gradient to compute, a residual of the output's dtype and
    shape laid out channels-last."""
    if records_gradients(nhwc, filters, bias, residual) or not _residual_fits(nhwc, filters, residual):
        return False
    return runs_natively(nhwc, filters)


def _residual_fits(nhwc: torch.Tensor, filters: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """No residual, or one the native kernels add as it is: the output's dtype and shape
    (N x C_out x H x W), laid out channels-last."""
    return residual is None or (residual.dtype == nhwc.dtype and residual.dim() == 4
                                and tuple(residual.shape) == (nhwc.shape[0], filters.shape[-1], *nhwc.shape[1:3])
                                and residual.permute(0, 2, 3, 1).is_contiguous())


def _natively(nhwc: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, dilation: int = 1, *,
              epilogue: tuple[torch.Tensor | None, bool] | None = None) -> torch.Tensor:
    """The convolution (plus `bias`) by the native transforms, at `dilation` over the map's
    phases in place (`native.gather_tiles`): N x H x W x C_out, contiguous, in
    `nhwc`'s dtype, the filters' (`runs_natively`). bf16: the kernels read and write bf16 and
    transform in float32, the products run in bf16; float32 copies of the map, the tiles and
    the products took 5-9% of a 512-channel convolution's time (32 x 32, 64 x 64) and 12% of a
    256-channel one's on 128 x 128. F(2x2) runs as one function (`_NativeF2x2`). With
    `epilogue` = (residual, relu) (no gradient: `_epilogue_in_transform`) the output transform
    also adds the residual (N x H x W x C_out, contiguous, or None) and applies the ReLU: a
    ResNet block's addition and ReLU, or a convolution's ReLU, cost no pass of their own."""
    n, height, width, _ = nhwc.shape
    tile = tile_of(filters)
    if epilogue is None:
        if tile == BF16_TILE:
            return _NativeF2x2.apply(nhwc, filters, bias, dilation)
        return output_map(torch.bmm(input_tiles(nhwc, tile, dilation), filters), bias, (n, height, width), tile,
                          dilation)
    residual, relu = epilogue
    b_t, _, a_t, _ = _native_matrices(tile)
    products = torch.bmm(native.gather_tiles(nhwc, b_t, step=tile, pad=1, dilation=dilation), filters)
    return native.scatter_tiles(products, a_t, (n, height, width), step=tile, pad=0,
                                bias=_native_bias(bias),
                                residual=residual, relu=relu, dilation=dilation)
