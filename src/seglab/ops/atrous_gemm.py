"""A dense atrous convolution with a large dilation as matrix products (CPU training).

DeepLab v3's ASPP at output stride 8 runs 3x3 convolutions 2048 -> 256 at dilations 12, 24 and
36 on a 64 x 64 map (a 512 input). oneDNN has fast kernels for small dilations only: in a bf16
training step of DeepLabV3-R50 (batch 1, 2 threads of a Xeon with AMX) the three took 1.9 s
forward and 1.2 s backward, about 60 GFLOP/s, over half the 5.9 s step. A stride-1, "same"-padded
dilated convolution is a sum over its taps, out[y, x] += W_tap . in[y + dy, x + dx], and on the
channels-last layout each tap is a (pixels x C_in) @ (C_in x C_out) matrix product added at the
tap's shift; the backward likewise, one product per tap for the input's gradient and one for
the weight's. Two layouts of those products, each equal to F.conv2d up to summation order
(tested, values and gradients):

- float32 (and float64), where at most `WINDOWS_UP_TO_SHARE` of the products land inside: per-tap
  windows (`_WindowedGemmConv`). Each tap multiplies only the
  pixels whose products land inside the map: at dilation 36 on 64 x 64 a corner tap reads
  28 x 28 pixels, and the nine taps 0.39 of what the padded convolution multiplies (0.56 at 24,
  0.77 at 12, `share_inside`). The taps of one kernel column read the same input columns, so
  each column's window is copied once and its row windows are contiguous blocks of the copy.
  Above that share the copies cost more than the products they skip.
- elsewhere, and under bf16 / fp16 autocast: one product of all pixels with all taps stacked,
  (pixels x C_in) @ (C_in x taps C_out), whose tap columns are added at the shifts in float32
  (`_ShiftedGemmConv`): windows would need a float32 sum after each tap's half-precision
  product, and the single product is the layout measured to pay there (AMX Xeon).

Not exact, the windows with `int8` (float32 training that takes int8 products,
`seglab.ops.int8_products`): their forward and input-gradient products in int8, one scale per
pixel of the map they read and one per row of each tap's matrix, each tap's int32 products
scaled back and added in float32 (the pixels' scales differ from tap to tap, so the sum over
taps cannot stay in int32); the weight's gradient stays float32, as the 1x1 products keep
theirs: the float32 windows', or Winograd's over the map's phases where it sums fewer
products (`weight_tile`, `seglab.ops.winograd.winograd_weight_gradient`). On DeepLabV3-R50's
ASPP (forward + backward at batch 4, Zen 4, `benchmarks/int8_atrous.py`): dilation 12 0.67 s
against Winograd's 0.83 s, 24 0.70 s against Winograd's 1.14 s, 36 0.56 s against the
float32 windows' 1.02 s.

`seglab.engine.fastpath.DilatedConvAsGemm` does the forward for inference (per tap, over only
the in-map windows); this module trains.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Iterator

import torch
import torch.nn as nn

from seglab.ops.atrous_depthwise import accumulator_dtype, shifted_route, taps_inside, trains
from seglab.ops.int8_products import MIN_PRODUCT_CHANNELS, dequantize_rows, quantize_rows
from seglab.ops.winograd import winograd_conv3x3, winograd_filters, winograd_weight_gradient

__all__ = ["AtrousConv2d", "all_taps_product", "int8_window_candidates", "share_inside", "shifted_gemm_conv",
           "takes_int8_windows", "windowed_gemm_conv"]

# From this dilation on the matrix products replace oneDNN's kernel (docs/bench.md: faster from 6).
MIN_DILATION = 6
# float32 forward + backward, 2048 -> 256 on 64 x 64, batch 2, median of 3 interleaved rounds,
# 2 cores of a Zen 3 EPYC (AVX2), oneDNN / all taps / windows: dilation 6 (share 0.88) 2.72 /
# 1.84 / 2.02 s, 12 (0.77) 2.30 / 1.87 / 1.66 s, 24 (0.56) 1.97 / 1.73 / 1.25 s, 36 (0.39)
# 1.66 / 1.83 / 0.90 s (docs/bench.md).
WINDOWS_UP_TO_SHARE = 0.8


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _stacked_taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """C_out x C_in x kh x kw -> (kh kw C_out) x C_in: every tap's matrix, one under the other."""
    return weight.to(dtype).permute(2, 3, 0, 1).reshape(-1, weight.shape[1])


class _ShiftedGemmConv(torch.autograd.Function):
    """Forward: one product of all pixels with all taps, Y = in @ [W_0; ...; W_k]^T, then
    out[target] += Y[window, tap] for each tap. Backward: the taps' shifted gradients side by
    side, G[window, tap] = grad_out[target] (zero elsewhere), so that grad_in = G @ [W_tap] and
    grad_W = G^T @ in are one product each. The products read whole contiguous maps; only
    tensors C_out wide (256 in the ASPP, against C_in = 2048) are shifted."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dilation: tuple[int, int]) -> torch.Tensor:
        dtype = _compute_dtype(x)
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.dtype, ctx.has_bias = dilation, dtype, bias is not None
        return all_taps_product(x.to(dtype), _stacked_taps(weight, dtype), bias, weight.shape[-2:], dilation)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dtype = ctx.dtype
        out_channels, in_channels, kh, kw = weight.shape
        pixels = x.to(dtype).permute(0, 2, 3, 1)
        grad_out = grad.to(dtype).permute(0, 2, 3, 1)
        shifted = torch.zeros((*grad_out.shape[:3], kh * kw, out_channels), dtype=dtype, device=x.device)
        for tap, (rows, cols), (out_rows, out_cols) in taps_inside(*x.shape[-2:], (kh, kw), ctx.dilation):
            shifted[:, rows, cols, tap] = grad_out[:, out_rows, out_cols]
        shifted = shifted.flatten(3)  # N H W (kh kw C_out)
        grad_pixels = torch.matmul(shifted, _stacked_taps(weight, dtype))
        grad_taps = torch.matmul(shifted.reshape(-1, shifted.shape[-1]).t(), pixels.reshape(-1, in_channels))
        grad_weight = grad_taps.view(kh, kw, out_channels, in_channels).permute(2, 3, 0, 1).to(weight.dtype)
        grad_bias = grad_out.sum((0, 1, 2), dtype=accumulator_dtype(dtype)).to(weight.dtype) if ctx.has_bias else None
        return grad_pixels.to(x.dtype).permute(0, 3, 1, 2), grad_weight, grad_bias, None


def _column_groups(height: int, width: int, kernel_size: tuple[int, int],
                   dilation: tuple[int, int]) -> list[tuple[slice, slice, list[tuple[int, slice, slice]]]]:
    """`taps_inside` grouped by kernel column: (input columns, output columns, [(tap, input rows,
    output rows)]); the taps of one column read and write the same columns."""
    groups: dict[tuple[int, ...], tuple[slice, slice, list[tuple[int, slice, slice]]]] = {}
    for tap, (rows, cols), (out_rows, out_cols) in taps_inside(height, width, kernel_size, dilation):
        key = (cols.start, cols.stop, out_cols.start, out_cols.stop)
        groups.setdefault(key, (cols, out_cols, []))[2].append((tap, rows, out_rows))
    return list(groups.values())


def _columns(maps: torch.Tensor, cols: slice) -> torch.Tensor:
    """maps[:, :, cols] of an N x H x W x C tensor, contiguous (maps itself for all columns)."""
    return maps if cols.stop - cols.start == maps.shape[2] else maps[:, :, cols].contiguous()


def _row_blocks(maps: torch.Tensor, rows: slice) -> Iterator[torch.Tensor]:
    """maps[:, rows] of a contiguous N x H x W x C tensor as (pixels x C) matrices that share its
    memory: one for the batch when the rows span the height, else one per image."""
    if rows.stop - rows.start == maps.shape[1]:
        yield maps.view(-1, maps.shape[-1])
    else:
        for image in maps:
            yield image[rows].view(-1, maps.shape[-1])


def _int8_shifted_sums(maps: torch.Tensor, tap_rows: torch.Tensor,
                       groups: list[tuple[slice, slice, list[tuple[int, slice, slice]]]]) -> torch.Tensor:
    """sum over taps of out[to] += maps[from] @ tap_rows[tap]^T for an N x H x W x C float32 map
    and taps x C_out x C matrices, each product in int8 (rows quantized: the map's pixels and
    the taps' rows) and added in float32; `groups` as `_column_groups` gives them, (columns read,
    columns written, [(tap, rows read, rows written)]). Returns N x H x W x C_out, contiguous."""
    n, height, width, channels = maps.shape
    levels, scales = quantize_rows(maps.reshape(-1, channels))
    levels, scales = levels.view(maps.shape), scales.view(n, height, width, 1)
    tap_levels, tap_scales = quantize_rows(tap_rows.reshape(-1, channels).contiguous())  # any weight layout
    tap_levels, tap_scales = tap_levels.view(tap_rows.shape), tap_scales.view(tap_rows.shape[:2])
    out = maps.new_zeros((n, height, width, tap_rows.shape[1]))
    for cols, out_cols, column_taps in groups:
        source, source_scales = _columns(levels, cols), _columns(scales, cols)
        target = out if source is levels else out.new_zeros((n, height, source.shape[2], out.shape[-1]))
        for tap, rows, out_rows in column_taps:
            blocks = zip(_row_blocks(source, rows), _row_blocks(source_scales, rows), _row_blocks(target, out_rows))
            for block, block_scales, out_block in blocks:
                products = torch._int_mm(block, tap_levels[tap].t())
                dequantize_rows(products, block_scales.view(-1), tap_scales[tap], out=out_block)
        if target is not out:
            out[:, :, out_cols] += target
    return out


def _reversed(groups: list[tuple[slice, slice, list[tuple[int, slice, slice]]]]
              ) -> list[tuple[slice, slice, list[tuple[int, slice, slice]]]]:
    """`_column_groups` read the other way, from the output's windows to the input's: the
    input gradient's products."""
    return [(out_cols, cols, [(tap, out_rows, rows) for tap, rows, out_rows in taps])
            for cols, out_cols, taps in groups]


class _WindowedGemmConv(torch.autograd.Function):
    """Per tap, over only the pixels whose products land inside the map: forward
    out[target] += in[window] @ W_tap^T; backward grad_in[window] += grad_out[target] @ W_tap and
    grad_W_tap = in[window]^T @ grad_out[target]. Products and sums in the input's dtype, or
    with `int8` the forward and the input's gradient as int8 products (`_int8_shifted_sums`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dilation: tuple[int, int], int8: bool = False, weight_tile: int | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias, ctx.int8, ctx.weight_tile = dilation, bias is not None, int8, weight_tile
        out_channels, _, kh, kw = weight.shape
        pixels = x.permute(0, 2, 3, 1)  # N H W C_in: a view of a channels-last input
        n, height, width, _ = pixels.shape
        groups = _column_groups(height, width, (kh, kw), dilation)
        if int8:
            out = _int8_shifted_sums(pixels, _stacked_taps(weight, weight.dtype).view(kh * kw, out_channels, -1), groups)
            if bias is not None:
                out += bias
            return out.permute(0, 3, 1, 2)
        taps = _tap_matrices(weight)
        out = torch.zeros((n, height, width, out_channels), dtype=x.dtype, device=x.device)
        for cols, out_cols, column_taps in groups:
            source = _columns(pixels, cols)
            target = out if source is pixels else out.new_zeros((n, height, source.shape[2], out_channels))
            for tap, rows, out_rows in column_taps:
                for block, out_block in zip(_row_blocks(source, rows), _row_blocks(target, out_rows)):
                    out_block.addmm_(block, taps[tap])
            if target is not out:
                out[:, :, out_cols] += target
        if bias is not None:
            out += bias
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        wants_input, wants_weight = ctx.needs_input_grad[:2]
        out_channels, in_channels, kh, kw = weight.shape
        taps = _tap_matrices(weight)
        pixels = x.permute(0, 2, 3, 1)
        n, height, width, _ = pixels.shape
        grad_out = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        groups = _column_groups(height, width, (kh, kw), ctx.dilation)
        int8_grad_input = None
        if wants_input and ctx.int8:  # each tap's rows W_tap^T, C_in x C_out
            transposed_taps = weight.permute(2, 3, 1, 0).reshape(kh * kw, in_channels, out_channels)
            int8_grad_input = _int8_shifted_sums(grad_out, transposed_taps, _reversed(groups)).permute(0, 3, 1, 2)
            wants_input = False  # the loop below: the weight's gradient only
        tile_grad_weight = None
        if wants_weight and ctx.weight_tile is not None:
            tile_grad_weight = winograd_weight_gradient(pixels.contiguous(), grad_out.contiguous(), ctx.weight_tile,
                                                        ctx.dilation[0])
            wants_weight = False
        grad_pixels = torch.zeros_like(pixels) if wants_input else None
        grad_taps = taps.new_zeros(taps.shape) if wants_weight else None
        for cols, out_cols, column_taps in groups if wants_input or wants_weight else []:  # else no column copies
            source, grad_target = _columns(pixels, cols), _columns(grad_out, out_cols)
            grad_source = None
            if wants_input:
                grad_source = grad_pixels if source is pixels else torch.zeros_like(source)
            for tap, rows, out_rows in column_taps:
                if wants_weight:
                    for block, grad_block in zip(_row_blocks(source, rows), _row_blocks(grad_target, out_rows)):
                        grad_taps[tap].addmm_(block.t(), grad_block)
                if wants_input:
                    for grad_block, grad_in_block in zip(_row_blocks(grad_target, out_rows), _row_blocks(grad_source, rows)):
                        grad_in_block.addmm_(grad_block, taps[tap].t())
            if wants_input and grad_source is not grad_pixels:
                grad_pixels[:, :, cols] += grad_source
        grad_input = grad_pixels.permute(0, 3, 1, 2) if wants_input else int8_grad_input
        grad_weight = grad_taps.view(kh, kw, in_channels, out_channels).permute(3, 2, 0, 1) if wants_weight \
            else tile_grad_weight
        grad_bias = grad_out.sum((0, 1, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None


def _tap_matrices(weight: torch.Tensor) -> torch.Tensor:
    """(kh kw) x C_in x C_out: each tap as the matrix pixels multiply, a transposed view of
    `_stacked_taps`'s rows (BLAS reads either order)."""
    out_channels, in_channels, kh, kw = weight.shape
    return _stacked_taps(weight, weight.dtype).view(kh * kw, out_channels, in_channels).transpose(1, 2)


def all_taps_product(x: torch.Tensor, stacked_taps: torch.Tensor, bias: torch.Tensor | None,
                     kernel_size: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """The forward of `shifted_gemm_conv` for a channels-last x and the taps already stacked,
    (kh kw C_out) x C_in, in x's dtype (no autograd): one product, then the shifted additions
    in float32 (float64 for float64 input). Returns x's dtype, channels-last."""
    out_channels = stacked_taps.shape[0] // (kernel_size[0] * kernel_size[1])
    pixels = x.permute(0, 2, 3, 1)  # N H W C_in: a view of a channels-last input
    per_tap = torch.matmul(pixels, stacked_taps.t()).unflatten(-1, (-1, out_channels))
    out = torch.zeros((*pixels.shape[:3], out_channels), dtype=accumulator_dtype(x.dtype), device=x.device)
    if bias is not None:
        out += bias.to(out.dtype)
    for tap, (rows, cols), (out_rows, out_cols) in taps_inside(*x.shape[-2:], tuple(kernel_size), dilation):
        out[:, out_rows, out_cols] += per_tap[:, rows, cols, tap]
    return out.to(x.dtype).permute(0, 3, 1, 2)


def share_inside(height: int, width: int, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> float:
    """The share of a "same"-padded convolution's products whose input pixel lies inside the
    map (the rest multiply padding): 0.77 at dilation 12 on 64 x 64, 0.56 at 24, 0.39 at 36."""
    windows = (source for _, source, _ in taps_inside(height, width, kernel_size, dilation))
    inside = sum((rows.stop - rows.start) * (cols.stop - cols.start) for rows, cols in windows)
    return inside / (kernel_size[0] * kernel_size[1] * height * width)


def shifted_gemm_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      dilation: tuple[int, int]) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=dilation * (k - 1) // 2, dilation=dilation) for a
    C_out x C_in x k x k kernel (odd k), as one matrix product for all taps; differentiable. Takes
    and returns channels-last tensors."""
    return _ShiftedGemmConv.apply(x, weight, bias, tuple(dilation))


def windowed_gemm_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       dilation: tuple[int, int], int8: bool = False, weight_tile: int | None = None) -> torch.Tensor:
    """The same convolution as `shifted_gemm_conv`, as one matrix product per tap over only the
    pixels it reads inside the map; differentiable. Takes and returns channels-last tensors;
    float32 or float64 (no autocast), x and weight of one dtype. `int8` (float32 on the CPU):
    the forward and the input's gradient as int8 products with one scale per row, about 1% off
    float32's like the 1x1 products (2048 channels of a rectified map); the weight's gradient
    float32's. `weight_tile` (a 3x3 kernel, square dilation, float32 CPU maps): the weight's
    gradient in Winograd's F(tile x tile) domain instead (`winograd_weight_gradient`), where
    that sums fewer products than the windows."""
    return _WindowedGemmConv.apply(x, weight, bias, tuple(dilation), int8, weight_tile)


def takes_int8_windows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a training call's windows may take int8 products: float32 input and weight
    outside autocast, and at least `MIN_PRODUCT_CHANNELS` channel pairs, as for the 1x1
    convolutions (fewer do not repay quantizing the map)."""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
            and weight.shape[0] * weight.shape[1] >= MIN_PRODUCT_CHANNELS)


def int8_window_candidates(model: nn.Module) -> int:
    """How many of `model`'s `AtrousConv2d` have the channels whose windows may take int8 products
    in training (`takes_int8_windows`: every float32 training call on a channels-last CPU map)."""
    return sum(1 for module in model.modules() if isinstance(module, AtrousConv2d)
               and module.in_channels * module.out_channels >= MIN_PRODUCT_CHANNELS)


class AtrousConv2d(nn.Conv2d):
    """A dense (groups=1), stride-1, "same"-padded dilated Conv2d (same parameters and state
    dict) that trains as matrix products on the CPU for channels-last input from dilation
    `MIN_DILATION` (`windowed_gemm_conv` in float32 where most taps reach outside the map,
    else `shifted_gemm_conv`); inference, other devices, NCHW input and tracing get the plain convolution (the
    fast path rewrites it for inference, `DilatedConvAsGemm`).

    `winograd_tile`, where the training route sets it (`seglab.engine.convolutions`), names the
    Winograd tile for a call, or None: a float32 3x3 convolution then trains by Winograd over
    the map's phases (`seglab.ops.winograd`) where that does fewer multiply-adds than the
    windows (at dilation 12 on 64 x 64, one 6 x 6 tile per phase). `int8_windows`, which the
    route sets where it takes int8 products, gives the float32 calls that `takes_int8_windows`
    the windows with int8 products, their weight gradient by that tile where there is one."""

    winograd_tile: Callable[[torch.Tensor, torch.Tensor], int | None] | None = None
    int8_windows: bool = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1, bias: bool = True) -> None:
        if kernel_size % 2 == 0 or stride != 1 or groups != 1:
            raise ValueError("AtrousConv2d takes an odd kernel, stride 1 and groups 1")
        same = dilation * (kernel_size - 1) // 2
        if padding is not None and padding != same:
            raise ValueError(f"AtrousConv2d pads by dilation * (kernel_size - 1) / 2 = {same}, not {padding}")
        super().__init__(in_channels, out_channels, kernel_size, padding=same, dilation=dilation, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if trains(self, x) and shifted_route(x, self.dilation, MIN_DILATION):
            tile = None if self.winograd_tile is None else self.winograd_tile(x, self.weight)
            if self.int8_windows and takes_int8_windows(x, self.weight):
                return windowed_gemm_conv(x, self.weight, self.bias, self.dilation, int8=True, weight_tile=tile)
            if tile is not None:
                return winograd_conv3x3(x, winograd_filters(self.weight, tile), self.bias, self.dilation[0])
            if _compute_dtype(x) in (torch.float32, torch.float64) and x.dtype == self.weight.dtype and \
                    share_inside(*x.shape[-2:], self.kernel_size, self.dilation) <= WINDOWS_UP_TO_SHARE:
                return windowed_gemm_conv(x, self.weight, self.bias, self.dilation)
            return shifted_gemm_conv(x, self.weight, self.bias, self.dilation)
        return self._conv_forward(x, self.weight, self.bias)
