"""A U-Net decoder's 3x3 convolution over cat([nearest_upsample(x), skip]) (and an FPN's
stride-4 head, the same convolution) by Winograd's F(4x4, 3x3) or F(6x6, 3x3) on the
upsampled grid, without building the upsampled or the concatenated map.

`seglab.ops.nearest_conv` computes x's share of that convolution as a stride-2 transposed
convolution at x's resolution (4 multiply-adds per output pixel and pair of channels instead
of 9) and adds the skip's share, a 3x3 convolution of its own. Winograd does fewer of both.
Its input tile for an m x m output tile is the (m + 2) x (m + 2) window of the upsampled map
at (m r - 1, m q - 1); nearest upsampling repeats each pixel of x in a 2 x 2 block, so that
window is `U w U^T`, w the (m/2 + 2) x (m/2 + 2) window of x at (m/2 r - 1, m/2 q - 1) and U
the (m + 2) x (m/2 + 2) matrix whose row i holds a single 1, in column floor((i + 1) / 2). x's
tiles in Winograd's domain are then `(B^T U) w (B^T U)^T`: one gather over x itself, with a
6 x 4 (F(4x4)) or 8 x 5 (F(6x6)) matrix at a stride of m/2, zeros outside x where the
upsampled map's padding is. The skip's tiles are the ordinary ones. The two shares of the
batched products add up in one buffer (x's channels and the skip's are the convolution's
input channels in two parts), and one output transform writes the result: 2.25 products per
output pixel and pair of channels with F(4x4), 1.78 with F(6x6), where the transposed
convolution takes 4; and one output map instead of two summed.

Measured against the transposed convolution plus the skip's share (by Winograd where that
pays), interleaved medians, 2-core Xeon (AVX-512, float32). Inference through the fast path:
512 + 256 -> 256 channels from 16 x 16 1.51x at batch 1, 1.29x at batch 8; 256 + 128 -> 128
from 32 x 32 1.23x and 1.03x. Forward and backward at batch 4: 1.33x and 1.19x (F(4x4)) /
1.31x (F(6x6)); but 128 + 64 -> 64 from 64 x 64 0.99x / 1.08x, 64 + 64 -> 32 from 128 x 128
0.85x / 0.91x (inference 1.00x and 0.87x). Hence its rule
(`seglab.engine.winograd.upsampling_output_tile`) wants 128 channels in x and out. UNet-R34
at 512 x 512 (its first two decoder steps): inference 1.02x, a training step 1.02x (41 and 21
interleaved rounds). An FPN's stride-4 head is the same convolution, over up(P3) and C2 through
its composed kernel (`seglab.models.semantic.fpn`), where the transposed convolution's share
was joined by a direct one at the high resolution: FPN-R34 at 512 x 512 inference 1.054x, a
training step 1.044x (31 and 15 interleaved rounds).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from seglab.ops import native
from seglab.ops.winograd import (input_matrix, input_tiles, output_map, runs_natively, tile_of, transformed_windows,
                                 winograd_conv3x3)

__all__ = ["UPSAMPLED_TILES", "winograd_conv3x3_of_nearest2x"]

UPSAMPLED_TILES = (4, 6)  # F(4x4) and F(6x6), float32's (an even tile covers whole pixels of x)


@functools.cache
def _upsampled_matrices(tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`B^T U` of F(tile x tile) (see above) and its transpose, float32 and contiguous, built
    outside inference mode (a matrix made under it could not be saved for a backward)."""
    with torch.inference_mode(False):
        rows = torch.arange(tile + 2)
        upsample = torch.zeros(tile + 2, tile // 2 + 2, dtype=torch.float64)
        upsample[rows, (rows + 1) // 2] = 1
        matrix = (input_matrix(tile) @ upsample).float()
        return matrix.contiguous(), matrix.t().contiguous()


def _register_native_matrices() -> None:
    """The gathers' matrices and their gradients' compiled into the native kernels."""
    pairs = [_upsampled_matrices(tile) for tile in UPSAMPLED_TILES]
    native.specialise(gathers=tuple(matrix for matrix, _ in pairs), scatters=tuple(t for _, t in pairs))


_register_native_matrices()


def winograd_conv3x3_of_nearest2x(x: torch.Tensor, skip: torch.Tensor | None, filters: torch.Tensor,
                                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(cat([interpolate(x, scale_factor=2, mode="nearest"), skip], 1), weight, bias,
    padding=1) (x alone when `skip` is None) given the weight's filters in Winograd's domain
    (`winograd_filters(weight, tile)`, x's channels first; F(4x4) or F(6x6) as above, F(2x2)
    through the upsampled map). Returns N x C_out x 2H x 2W, channels last, in x's dtype.
    Float32 CPU maps go by the native kernels as above; anything else builds the upsampled,
    concatenated map for `winograd_conv3x3`. Differentiable."""
    tile = tile_of(filters)
    n, low_channels, height, width = x.shape
    size = (2 * height, 2 * width)
    skip_channels = 0 if skip is None else skip.shape[1]
    if filters.shape[1] != low_channels + skip_channels:
        raise ValueError(f"filters of shape {tuple(filters.shape)} do not take {low_channels} + {skip_channels} "
                         "input channels")
    if skip is not None and (tuple(skip.shape[-2:]) != size or skip.shape[0] != n):
        raise ValueError(f"a skip of shape {tuple(skip.shape)} is not the 2x upsampling of {tuple(x.shape)}")
    nhwc = x.permute(0, 2, 3, 1)
    if (tile not in UPSAMPLED_TILES or not runs_natively(nhwc, filters)
            or (skip is not None and skip.dtype != x.dtype)):
        upsampled = F.interpolate(x, scale_factor=2, mode="nearest")
        return winograd_conv3x3(upsampled if skip is None else torch.cat([upsampled, skip], 1), filters, bias)
    matrix, gradient_matrix = _upsampled_matrices(tile)
    tiles = transformed_windows(nhwc.contiguous(), matrix, gradient_matrix, tile // 2)
    products = torch.bmm(tiles, filters[:, :low_channels])
    if skip is not None:
        # In place: neither product's gradient needs the products themselves.
        products = products.baddbmm_(input_tiles(skip.permute(0, 2, 3, 1).contiguous(), tile),
                                     filters[:, low_channels:])
    return output_map(products, bias, (n, *size), tile).permute(0, 3, 1, 2)
