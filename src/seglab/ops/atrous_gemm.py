"""A dense atrous convolution with a large dilation as one matrix product for all taps (CPU training).

DeepLab v3's ASPP at output stride 8 runs 3x3 convolutions 2048 -> 256 at dilations 12, 24 and
36 on a 64 x 64 map (a 512 input). oneDNN has fast kernels for small dilations only: in a bf16
training step of DeepLabV3-R50 (batch 1, 2 threads of a Xeon with AMX) the three took 1.9 s
forward and 1.2 s backward, about 60 GFLOP/s, over half the 5.9 s step. A stride-1, "same"-padded
dilated convolution is a sum over its taps: out[y, x] += W_tap . in[y + dy, x + dx], and on the
channels-last layout all taps together are one (pixels x C_in) @ (C_in x taps C_out) matrix
product, whose tap columns are then added at the taps' shifts; the backward, likewise, one
product for the input's gradient and one for the weight's (`_ShiftedGemmConv`).
`seglab.engine.fastpath.DilatedConvAsGemm` does the forward for inference (per tap, over only
the in-map windows); this module trains.

Products run in the input's dtype (autocast's when autocast is on, as a convolution would);
sums are float32. Equal to F.conv2d up to summation order (tested, values and gradients).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from seglab.ops.atrous_depthwise import accumulator_dtype, shifted_route, taps_inside, trains

__all__ = ["AtrousConv2d", "all_taps_product", "share_inside", "shifted_gemm_conv"]

# From this dilation on the matrix products replace oneDNN's kernel (docs/bench.md: faster from 6).
MIN_DILATION = 6


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


class AtrousConv2d(nn.Conv2d):
    """A dense (groups=1), stride-1, "same"-padded dilated Conv2d (same parameters and state
    dict) that trains as matrix products (`shifted_gemm_conv`) on the CPU for channels-last input from
    dilation `MIN_DILATION`; inference, other devices, NCHW input and tracing get the plain
    convolution (the fast path rewrites it for inference, `DilatedConvAsGemm`)."""

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
            return shifted_gemm_conv(x, self.weight, self.bias, self.dilation)
        return self._conv_forward(x, self.weight, self.bias)
