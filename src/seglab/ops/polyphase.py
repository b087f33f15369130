"""A transposed convolution whose kernel is twice its stride, as one ordinary convolution at
the input's resolution.

FCN upsamples its class scores by transposed convolutions of stride s, kernel 2s and padding
s/2 (`seglab.ops.upsample.TransposedConv`: bilinear-initialised; the final one, held fixed as
the paper trains it, runs as bilinear interpolation instead, so this module computes the x8 to
x32 ones of `learn_final_upsampling=True`). Input pixel q reaches
output rows s*q - s/2 ... s*q + 3s/2 - 1, so every output pixel reads exactly two input rows
and two input columns. Without the padding, output row s*q + t (phase t = 0..s-1) is

    x[q] * w[t] + x[q-1] * w[s + t]        (columns alike),

one 2x2 convolution over x padded by a pixel on each side, one output channel per phase and
output channel: s*s*C_out channels at (H+1) x (W+1), which interleave into the output; the
padding s/2 then crops s/2 phases off each border. The multiply-adds are the transposed
convolution's (times (H+1)(W+1) / HW), but as products of a pixels x 4 C_in matrix with a
4 C_in x s*s*C_out one, where oneDNN's transposed kernel for FCN's 21 classes reaches a
fraction of the processor's rate. The interleave is four strided copies (one per pair of
half-phases, which come from different input rows) forward, and the same four backward.

Measured on a 2-core Zen 4 (AVX-512 BF16; `python benchmarks/polyphase.py`), batch 4, 21 -> 21
channels to 512 x 512, forward + backward (both gradients), oneDNN / phases: bf16 x8 from
64 x 64 134 / 70 ms, x16 163 / 66, x32 175 / 96; float32 153 / 108, 161 / 103, 222 / 128.
oneDNN's backward is the slow part: the forward alone gains little or loses (bf16 x8 26 / 24
ms; 64 channels 89 / 121; batch 1 6.3 / 6.1), and at x4 (32 x 32 maps, 1-7 ms) and x2 the
copies cost what the product saves. So the phases take training calls (which record
gradients) at strides from `MIN_STRIDE` = 8; inference keeps oneDNN's kernel.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.ops import native
from seglab.ops.grad_mode import records_gradients
from seglab.ops.tracing import being_traced

__all__ = ["MIN_STRIDE", "PolyphaseConvTranspose2d", "polyphase_conv_transpose2d", "polyphase_weight",
           "takes_polyphase"]

MIN_STRIDE = 8  # below it oneDNN's own transposed kernel is as fast (see the docstring)


def takes_polyphase(x: torch.Tensor, conv: nn.ConvTranspose2d) -> bool:
    """Whether `conv(x)` is a CPU transposed convolution this module computes: kernel 2s,
    stride s >= MIN_STRIDE, padding s/2, no output padding, dilation or groups, in eager code
    that records gradients (training)."""
    stride = conv.stride[0]
    return (x.device.type == "cpu" and x.dim() == 4 and stride >= MIN_STRIDE and stride % 2 == 0
            and records_gradients(x, conv.weight)
            and conv.stride == (stride, stride) and conv.kernel_size == (2 * stride, 2 * stride)
            and conv.padding == (stride // 2, stride // 2) and conv.output_padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not being_traced())


def polyphase_weight(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """C_in x C_out x 2s x 2s transposed-convolution kernel -> the (s*s*C_out) x C_in x 2 x 2
    kernel of the phase convolution, output channels ordered (row phase, column phase, C_out).
    Tap 0 of the 2x2 window reads the earlier input pixel, which meets kernel taps s..2s-1."""
    c_in, c_out = weight.shape[:2]
    halves = weight.view(c_in, c_out, 2, stride, 2, stride).flip(2, 4)  # [ci, co, tap_y, t_y, tap_x, t_x]
    return halves.permute(3, 5, 1, 0, 2, 4).reshape(stride * stride * c_out, c_in, 2, 2)


def _quadrants(phases: torch.Tensor, output: torch.Tensor, stride: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of matching views (phase map, output) covering the output once. `phases` is the
    N x (s*s*C) x (H+1) x (W+1) convolution result, `output` the N x C x sH x sW map."""
    n, channels, height, width = output.shape
    s, half = stride, stride // 2
    rows, cols = height // s, width // s
    # [n, q, t_y, r, t_x, c]: uncropped output row s*q + t_y, column s*r + t_x.
    by_phase = phases.permute(0, 2, 3, 1).view(n, rows + 1, cols + 1, s, s, channels).permute(0, 1, 3, 2, 4, 5)
    # [n, q, t, r, t', c]: output row s*q + t, column s*r + t' (after the crop by s/2).
    out = output.permute(0, 2, 3, 1).view(n, rows, s, cols, s, channels)
    # Output phases t < s/2 are phase t + s/2 of the same q; t >= s/2 phase t - s/2 of q + 1.
    first, second = slice(0, half), slice(half, s)
    row_parts = [(first, slice(0, rows), second), (second, slice(1, rows + 1), first)]
    col_parts = [(first, slice(0, cols), second), (second, slice(1, cols + 1), first)]
    return [(by_phase[:, q, ty, r, tx], out[:, :, t, :, u])
            for t, q, ty in row_parts for u, r, tx in col_parts]


def _native_interleave(tensor: torch.Tensor) -> bool:
    """Whether the interleave of (or into) this map runs natively: a CPU map, the kernels built."""
    return tensor.device.type == "cpu" and native.available()


class _Interleave(torch.autograd.Function):
    """The phase map -> the cropped output map (strided copies); backward the reverse, with
    zeros for the phases the crop drops. On the CPU, where the native kernels are built, one
    pass of contiguous runs each way (`native.interleave_phases`; the same values): FCN-8s' x8
    to 4 x 21 x 512 x 512 in bf16 5.95 -> 3.18 ms forward, 9.16 -> 3.23 ms backward (Zen 4)."""

    @staticmethod
    def forward(ctx, phases: torch.Tensor, stride: int) -> torch.Tensor:  # type: ignore[override]
        ctx.stride = stride
        if _native_interleave(phases) and phases.is_contiguous(memory_format=torch.channels_last):
            return native.interleave_phases(phases, stride)
        n, channels = phases.shape[0], phases.shape[1] // (stride * stride)
        height, width = (phases.shape[2] - 1) * stride, (phases.shape[3] - 1) * stride
        output = torch.empty(n, channels, height, width, dtype=phases.dtype, device=phases.device,
                             memory_format=torch.channels_last)
        for source, target in _quadrants(phases, output, stride):
            target.copy_(source)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        stride = ctx.stride
        if _native_interleave(grad_output):
            return native.interleave_phases_backward(grad_output.contiguous(memory_format=torch.channels_last), stride), None
        n, channels, height, width = grad_output.shape
        grad_phases = torch.empty(n, stride * stride * channels, height // stride + 1, width // stride + 1,
                                  dtype=grad_output.dtype, device=grad_output.device,
                                  memory_format=torch.channels_last).zero_()
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
        for source, target in _quadrants(grad_phases, grad_output, stride):
            source.copy_(target)
        return grad_phases, None


def polyphase_conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               stride: int) -> torch.Tensor:
    """F.conv_transpose2d(x, weight, bias, stride, padding=stride // 2) for a 2s x 2s `weight`
    and even `stride`, as the phase convolution (differentiable; autocast applies to it as to
    any convolution). Computed channels-last, oneDNN's layout; an NCHW x gets an NCHW copy."""
    phases = F.conv2d(F.pad(x.contiguous(memory_format=torch.channels_last), (1, 1, 1, 1)),
                      polyphase_weight(weight, stride))
    output = _Interleave.apply(phases, stride)
    if bias is not None:
        output = output + bias.to(output.dtype).view(1, -1, 1, 1)
    return output if x.is_contiguous(memory_format=torch.channels_last) else output.contiguous()


class PolyphaseConvTranspose2d(nn.ConvTranspose2d):
    """An nn.ConvTranspose2d (same parameters and state dict) computed by the phase convolution
    where `takes_polyphase` says it applies (training on the CPU), by the plain kernel elsewhere."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is None and takes_polyphase(x, self):
            return polyphase_conv_transpose2d(x, self.weight, self.bias, self.stride[0])
        return super().forward(x, output_size)
