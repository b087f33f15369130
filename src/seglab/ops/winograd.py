"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3) (Lavin & Gray, "Fast
Algorithms for Convolutional Neural Networks", CVPR 2016).

A 4 x 4 tile of a 3x3 convolution's output depends on a 6 x 6 tile `d` of its input. Computed
directly it takes 4 * 4 * 9 = 144 multiply-adds per pair of input and output channels; Winograd
transforms the input tile (`B^T d B`) and the filter `g` (`G g G^T`, once) into 6 x 6 tiles
whose elementwise product, transformed back (`A^T (.) A`), is the output tile: 36 products.
Summed over the input channels, the 36 elementwise products become 36 independent matrix
products, [tiles x C_in] @ [C_in x C_out], which a BLAS runs at full speed. The transforms
cost a constant per channel, the products one per pair of channels, so the method pays where
channels are many: 4x fewer multiply-adds than the direct convolution, minus the transforms.

The price is precision: the transforms' coefficients (up to 8 in `A`, 1/24 in `G`) cost a few
bits, about 6e-6 of the largest output on random float32 data against ~1e-7 for a direct
convolution. So this serves float32, where those bits are spare; bfloat16 has none to spare.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["TILE", "winograd_conv3x3", "winograd_filters"]

TILE = 4  # output pixels per tile side; the input tile is TILE + 2

# The paper's matrices for F(4, 3), interpolating at 0, 1, -1, 2, -2 and infinity.
_B_T = torch.tensor([
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
], dtype=torch.float64)
_G = torch.tensor([
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
], dtype=torch.float64)
_G_KRON_G = torch.kron(_G, _G)  # row 6 i + l, column 3 j + k: G[i, j] G[l, k]
_A_T = torch.tensor([
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
], dtype=torch.float64)


def winograd_filters(weight: torch.Tensor) -> torch.Tensor:
    """The 3x3 filters `weight` (C_out x C_in x 3 x 3) in Winograd's domain, `G g G^T`, laid out
    as the 36 matrices the products take: 36 x C_in x C_out, in `weight`'s dtype
    (differentiable)."""
    out_channels, in_channels, kh, kw = weight.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"Winograd F(4x4, 3x3) takes 3x3 filters, not {kh}x{kw}")
    # At least float32, not float64 for float32 weights, so that training's backward through
    # it stays cheap: G's rounding (1/6, 1/24) is ~1e-7, far below the method's own.
    dtype = torch.promote_types(weight.dtype, torch.float32)
    # G g G^T for all filters at once: the 36 x 9 Kronecker product of G with itself times the
    # filters laid out tap by tap (9 x (C_in C_out), a copy of the small weight), which writes
    # the 36 matrices in place. An einsum of the two products took 3x as long forward and
    # backward (256 x 768 filters: 70 against 24 ms), in copies of its large intermediate.
    taps = weight.to(dtype).permute(2, 3, 1, 0).reshape(9, in_channels * out_channels)
    transformed = _G_KRON_G.to(weight.device, dtype) @ taps
    return transformed.view(36, in_channels, out_channels).to(weight.dtype)


def _transform(matrix: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """`matrix @ tile @ matrix^T` for every tile of `tiles` (n x n x rest, the tile's two axes
    first): one product along each axis. Separable, it takes 2n multiply-adds per output
    element where the Kronecker product of the matrix with itself would take n^2."""
    n, rest = tiles.shape[0], tiles.shape[2:]
    rows = (matrix @ tiles.reshape(n, -1)).view(matrix.shape[0], n, -1)
    return (matrix @ rows).view(matrix.shape[0], matrix.shape[0], *rest)


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None = None,
                     dilation: int = 1) -> torch.Tensor:
    """The stride-1 3x3 convolution of `x` (N x C_in x H x W) with zero padding `dilation` (the
    size-preserving one) at `dilation`, given its filters in Winograd's domain
    (`winograd_filters`), plus `bias`. Returns N x C_out x H x W in the channels-last layout.
    Differentiable (every step is a PyTorch operator)."""
    n, in_channels, height, width = x.shape
    if filters.shape[:2] != (36, in_channels):
        raise ValueError(f"filters of shape {tuple(filters.shape)} do not take {in_channels} input channels")
    nhwc = x.permute(0, 2, 3, 1)
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
    """The overlapping 6 x 6 tiles at a stride of 4 of a padded N x H x W x C map, tile axes
    first: 6 x 6 x (N rows cols) x C. Its gradient adds each tile's two overlapping rows and
    columns onto its neighbour's with whole-slice additions; autograd's gradient of `unfold`
    (a generic scatter) took 4x as long (63 against 15 ms, forward and backward, for 64
    channels on 128 x 128 at batch 4)."""

    @staticmethod
    def forward(ctx: Any, padded: torch.Tensor) -> torch.Tensor:
        n, height, width, channels = padded.shape
        rows, cols = (height - 2) // TILE, (width - 2) // TILE
        ctx.dims = (n, rows, cols, channels)
        tiles = padded.unfold(1, TILE + 2, TILE).unfold(2, TILE + 2, TILE).permute(4, 5, 0, 1, 2, 3)
        return tiles.reshape(TILE + 2, TILE + 2, n * rows * cols, channels)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        n, rows, cols, channels = ctx.dims
        overlap = slice(TILE, TILE + 2)
        # Columns: tile column j of tile c lands on map column TILE c + j; j = 4, 5 are the next
        # tile's 0, 1. Blocks of TILE columns, one more than the tiles for the last overlap.
        per_row = grad.reshape(TILE + 2, TILE + 2, n, rows, cols, channels).permute(0, 2, 3, 4, 1, 5)
        blocks = grad.new_empty(TILE + 2, n, rows, cols + 1, TILE, channels)
        blocks[:, :, :, :cols] = per_row[..., :TILE, :]
        blocks[:, :, :, cols, :2] = 0
        blocks[:, :, :, 1:, :2] += per_row[..., overlap, :]
        width = TILE * cols + 2
        by_row = blocks.view(TILE + 2, n, rows, TILE * (cols + 1), channels)[:, :, :, :width].permute(1, 2, 0, 3, 4)
        # Rows likewise.
        out = grad.new_empty(n, rows + 1, TILE, width, channels)
        out[:, :rows] = by_row[:, :, :TILE]
        out[:, rows, :2] = 0
        out[:, 1:, :2] += by_row[:, :, overlap]
        return out.view(n, TILE * (rows + 1), width, channels)[:, :TILE * rows + 2]


def _undilated(nhwc: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """The undilated 3x3 convolution, zero padding 1, of the channels-last map `nhwc`
    (N x H x W x C_in): N x H x W x C_out, not necessarily contiguous."""
    n, height, width, in_channels = nhwc.shape
    out_channels = filters.shape[-1]
    rows, cols = -(-height // TILE), -(-width // TILE)
    # Zero-pad to whole tiles plus the filter's border.
    padded = F.pad(nhwc, (0, 0, 1, cols * TILE + 1 - width, 1, rows * TILE + 1 - height))
    count = n * rows * cols
    inputs = _transform(_B_T.to(nhwc), _InputTiles.apply(padded))
    products = torch.bmm(inputs.view(36, count, in_channels), filters)
    outputs = _transform(_A_T.to(nhwc), products.view(TILE + 2, TILE + 2, count, out_channels))
    # TILE x TILE x N x rows x cols x C_out -> N x (rows, TILE) x (cols, TILE) x C_out
    outputs = outputs.view(TILE, TILE, n, rows, cols, out_channels).permute(2, 3, 0, 4, 1, 5)
    return outputs.reshape(n, rows * TILE, cols * TILE, out_channels)[:, :height, :width]
