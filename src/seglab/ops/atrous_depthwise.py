"""The depthwise half of an atrous separable convolution (DeepLab v3+'s ASPP), as shifted
windows on the CPU.

A stride-1, "same"-padded depthwise k x k convolution with dilation d is, per channel, the sum
over taps of the tap's weight times the input shifted by the tap's offset: out[y, x] +=
w_tap * in[y + dy, x + dx]. On the channels-last layout each tap is one multiply-add of a
window of the map with a per-channel scale that runs along contiguous memory, and taps (or
parts of taps) that fall into the padding are never touched: at dilation 18 on a 32 x 32 map
the corner taps read 14 x 14 pixels, and most of what the padded convolution multiplies is
zeros. oneDNN's depthwise kernels slow with the dilation instead; forward and backward, 4 x 512
x 32 x 32 (DeepLab v3+-R34's ASPP at a 512 input, batch 4), bf16 autocast, 2 threads of a Xeon
with AMX: dilation 6 67 ms -> 47 ms, 12 81 -> 39 ms, 18 181 -> 29 ms with the shifted windows
(the whole bf16 training step 2.67 -> 2.45 s); in float32 6 34 -> 42 ms (oneDNN the faster),
12 56 -> 36, 18 88 -> 24. In inference oneDNN's forward is fast at dilation 6 (1.4 ms in
bf16). So the windows take over from dilation 6 in bf16 / fp16 training and from 12 otherwise.

Sums are in float32 (float64 for float64 input); the result has the input's dtype, as a
convolution under autocast would. Equal to F.conv2d up to summation order (tested, values and
gradients).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn

from seglab.ops.grad_mode import records_gradients
from seglab.ops.tracing import being_traced

__all__ = ["AtrousDepthwiseConv2d", "shifted_depthwise_conv", "taps_inside"]

# Dilations from which the shifted windows run instead of oneDNN's kernel (see the docstring).
HALF_PRECISION_TRAINING_MIN_DILATION = 6
MIN_DILATION = 12


def taps_inside(height: int, width: int, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> Iterator[tuple[int, tuple[slice, slice], tuple[slice, slice]]]:
    """For each tap of a stride-1, "same"-padded dilated kernel that reads inside a `height` x
    `width` map: (tap index, the input rows and columns it reads, the output rows and columns
    they land on); out[y, x] += W_tap . in[y + dy, x + dx]. Taps entirely outside are skipped."""
    (kh, kw), (dh, dw) = kernel_size, dilation
    for i in range(kh):
        for j in range(kw):
            dy, dx = (i - kh // 2) * dh, (j - kw // 2) * dw
            if abs(dy) >= height or abs(dx) >= width:
                continue
            source = (slice(max(0, dy), height + min(0, dy)), slice(max(0, dx), width + min(0, dx)))
            target = (slice(max(0, -dy), height - max(0, dy)), slice(max(0, -dx), width - max(0, dx)))
            yield i * kw + j, source, target


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the shifted sums run in: float32, or float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def _taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """C x 1 x kh x kw depthwise kernel -> (kh kw) x C: one per-channel scale per tap."""
    return weight.reshape(weight.shape[0], -1).t().to(dtype)


def _forward(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, kernel_size: tuple[int, int],
             dilation: tuple[int, int]) -> torch.Tensor:
    height, width = x.shape[-2:]
    accumulate = taps.dtype
    pixels = x.permute(0, 2, 3, 1)  # N H W C: a view of a channels-last input
    out = torch.zeros(pixels.shape, dtype=accumulate, device=x.device)
    if bias is not None:
        out += bias.to(accumulate)
    for tap, (rows, cols), (out_rows, out_cols) in taps_inside(height, width, kernel_size, dilation):
        out[:, out_rows, out_cols].addcmul_(pixels[:, rows, cols].to(accumulate), taps[tap])
    return out.to(x.dtype).permute(0, 3, 1, 2)


class _ShiftedDepthwise(torch.autograd.Function):
    """Forward and backward of the shifted-window depthwise convolution. The backward is the
    same windows the other way round: grad_in[window] += grad_out[target] * w_tap, and each
    tap's weight gradient sums grad_out[target] * in[window] over the batch and the window."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dilation: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        return _forward(x, _taps(weight, accumulator_dtype(x.dtype)), bias, tuple(weight.shape[-2:]), dilation)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        accumulate = accumulator_dtype(x.dtype)
        kernel_size = tuple(weight.shape[-2:])
        taps = _taps(weight, accumulate)
        grad_out = grad.permute(0, 2, 3, 1).to(accumulate)
        pixels = x.permute(0, 2, 3, 1)
        grad_pixels = torch.zeros(pixels.shape, dtype=accumulate, device=x.device)
        grad_taps = torch.zeros_like(taps)
        for tap, (rows, cols), (out_rows, out_cols) in taps_inside(*x.shape[-2:], kernel_size, ctx.dilation):
            window_grad = grad_out[:, out_rows, out_cols]
            grad_pixels[:, rows, cols].addcmul_(window_grad, taps[tap])
            grad_taps[tap] = (window_grad * pixels[:, rows, cols].to(accumulate)).sum((0, 1, 2))
        grad_weight = grad_taps.t().reshape(weight.shape).to(weight.dtype)
        grad_bias = grad_out.sum((0, 1, 2)).to(weight.dtype) if ctx.has_bias else None
        return grad_pixels.to(x.dtype).permute(0, 3, 1, 2), grad_weight, grad_bias, None


def shifted_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           dilation: tuple[int, int]) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=dilation * (k - 1) // 2, dilation=dilation,
    groups=C) for a C x 1 x k x k kernel (odd k), as shifted windows; differentiable."""
    return _ShiftedDepthwise.apply(x, weight, bias, tuple(dilation))


def trains(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether this call of `conv` on `x` records gradients."""
    return records_gradients(x, conv.weight)


def shifted_route(x: torch.Tensor, dilation: tuple[int, ...], min_dilation: int) -> bool:
    """Whether a dilated convolution takes the shifted-window route: CPU, channels-last input,
    dilation from `min_dilation`, eager code (a tracer gets the plain convolution)."""
    return (x.device.type == "cpu" and max(dilation) >= min_dilation
            and x.is_contiguous(memory_format=torch.channels_last) and not being_traced())


class AtrousDepthwiseConv2d(nn.Conv2d):
    """A depthwise, stride-1, "same"-padded dilated Conv2d (same parameters and state dict)
    that runs as shifted windows on the CPU for a channels-last input from the dilations where
    they are the faster (bf16 / fp16 training from 6, otherwise from 12); below, on other
    devices, for NCHW input or under a tracer, a plain convolution."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, bias: bool = False) -> None:
        if kernel_size % 2 == 0:
            raise ValueError("AtrousDepthwiseConv2d takes an odd kernel size")
        super().__init__(channels, channels, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                         dilation=dilation, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.element_size() < 4  # bf16 / fp16 activations (autocast)
        threshold = HALF_PRECISION_TRAINING_MIN_DILATION if trains(self, x) and half else MIN_DILATION
        if shifted_route(x, self.dilation, threshold):
            return shifted_depthwise_conv(x, self.weight, self.bias, self.dilation)
        return self._conv_forward(x, self.weight, self.bias)
