"""Training's largest matrix products in 8-bit integers, with one scale per row (CPU, float32).

A ResNet-50's 1x1 convolutions are plain matrix products of the channels-last map: forward
out = X W^T, backward grad_X = G W and grad_W = G^T X (X pixels x C_in, G pixels x C_out).
On processors with VNNI, `torch._int_mm` multiplies int8 matrices about four times as fast as
float32 (16384 x 2048 x 512: 930 against 240 GFLOP/s on a 2-core AVX-512 VNNI Xeon).

Row-wise quantization keeps the rounding small where training needs it (after SwitchBack,
Wortsman et al. 2023, "Stable and low-precision training for large-scale vision-language
models"): every row of both factors gets its own scale, absmax / 127, so a product
sum_k a[m, k] b[n, k] comes back as int32 times scale_a[m] times scale_b[n], with no
per-tensor range to calibrate and no pixel's outliers coarsening another pixel's levels.

- forward: X by pixel, W by output channel;
- the input's gradient: G by pixel, W by input channel;
- the weight's gradient stays float32: its sum runs over every pixel of the batch, where one
  scale per row would round small gradients away (SwitchBack keeps it in 16 bits for the same
  reason). Scales that do factor out of that sum, per channel over blocks of pixels, erred by
  1.3-13.6% on DeepLabV3-R50's gradients, against 0.5-1% for the other two products
  (`benchmarks/int8_weight_gradients.py`).

The forward and the input's gradient differ from float32 by about 0.5% and 1% of their size
(relative L2 norm, random data); the weight's gradient is float32's. The ASPP's dilated 3x3
convolutions take the same quantizers tap by tap (`seglab.ops.atrous_gemm`, `int8=True`).
"""
from __future__ import annotations

from typing import Any

import torch

from seglab.ops import native
from seglab.ops.layout import channel_sums, pixel_rows

__all__ = ["INT8_LEVELS", "MIN_PRODUCT_CHANNELS", "dequantize_rows", "int8_pointwise_conv", "int8_product",
           "int8_pointwise_candidates", "quantize_rows", "takes_int8_pointwise"]

INT8_LEVELS = 127  # symmetric: -127..127
# C_in x C_out from which the int8 1x1 convolution pays in training (forward + backward, batch 4,
# interleaved, AVX-512 VNNI Xeon): 128 x 512 on 64 x 64 1.10x, 256 x 1024 1.41x, 2048 x 512
# 1.58x; 64 x 256 on 128 x 128 0.84x, 64 x 64 0.73x (quantizing costs a pass per map).
MIN_PRODUCT_CHANNELS = 128 * 512


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A rows x columns float32 matrix (contiguous rows) as int8 levels round(x * 127 / absmax)
    (half to even) with absmax each row's largest magnitude, and the rows' scales absmax / 127
    (0 for a row of zeros). One native pass where the kernels are built, else PyTorch's
    operators (the same levels)."""
    if native.available() and x.device.type == "cpu":
        return native.quantize_rows_s8(x)
    largest = x.abs().amax(dim=1)
    inverse = torch.where(largest > 0, INT8_LEVELS / largest, torch.zeros_like(largest))
    levels = torch.round(x * inverse[:, None]).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return levels, largest / INT8_LEVELS


def dequantize_rows(products: torch.Tensor, row_scales: torch.Tensor, column_scales: torch.Tensor,
                    bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 products as float32, products[r, c] * row_scales[r] * column_scales[c] (+ bias[c]);
    with `out` (float32, contiguous), added to it and returned."""
    if native.available() and products.device.type == "cpu":
        return native.dequantize_rows(products, row_scales, column_scales, bias, out=out)
    scales = row_scales[:, None] * column_scales[None, :]
    if out is None:
        out = bias.expand_as(scales).clone() if bias is not None else torch.zeros_like(scales)
    elif bias is not None:
        out += bias
    return out.addcmul_(products.float(), scales)


def int8_product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b^T (+ bias) for float32 a (M x K) and b (N x K), both quantized by row, the products
    summed in int32."""
    a_levels, a_scales = quantize_rows(a)
    b_levels, b_scales = quantize_rows(b)
    return dequantize_rows(torch._int_mm(a_levels, b_levels.t()), a_scales, b_scales, bias)


def _maps(pixels: torch.Tensor, like: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `pixel_rows`: (N H W) x C -> a channels-last N x C x H x W view."""
    n, _, h, w = like
    return pixels.view(n, h, w, pixels.shape[1]).permute(0, 3, 1, 2)


class _Int8PointwiseConv(torch.autograd.Function):
    """A 1x1, stride-1 convolution: forward and input gradient as row-quantized int8 products,
    the weight's gradient (and the bias's) in float32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        matrix = weight.reshape(weight.shape[0], -1)
        return _maps(int8_product(pixel_rows(x), matrix, bias), x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_pixels = pixel_rows(grad.contiguous(memory_format=torch.channels_last))
        matrix = weight.reshape(weight.shape[0], -1)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = _maps(int8_product(grad_pixels, matrix.t().contiguous()), x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_pixels.t() @ pixel_rows(x)).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = channel_sums(grad)
        return grad_input, grad_weight, grad_bias


def int8_pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        stride: int = 1) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride) for a C_out x C_in x 1 x 1 float32 weight, with the
    forward and the input's gradient as int8 products (module docstring); differentiable.
    Returns a channels-last map."""
    if stride != 1:
        x = x[:, :, ::stride, ::stride]  # a 1x1 convolution with a stride reads only these pixels
    return _Int8PointwiseConv.apply(x, weight, bias)


def _large_pointwise(conv: torch.nn.Conv2d) -> bool:
    """A 1x1 convolution of one group, no padding, equal strides and at least
    `MIN_PRODUCT_CHANNELS` channel pairs: what the int8 products take, whatever its input."""
    return (conv.kernel_size == (1, 1) and conv.groups == 1 and conv.padding in ((0, 0), "valid")
            and conv.stride[0] == conv.stride[1] and conv.in_channels * conv.out_channels >= MIN_PRODUCT_CHANNELS)


def takes_int8_pointwise(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv`'s call on `x` takes `int8_pointwise_conv`: a large 1x1 convolution
    (`_large_pointwise`), float32, on a channels-last CPU map."""
    return (_large_pointwise(conv) and x.device.type == "cpu" and x.dim() == 4
            and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last))


def int8_pointwise_candidates(model: torch.nn.Module) -> int:
    """How many of `model`'s convolutions are 1x1 convolutions the int8 products take (on a
    float32 channels-last CPU map): a ResNet-50's bottlenecks have them, a U-Net with 16 base
    channels none, so that `seglab train --int8-products` can say so instead of doing nothing."""
    return sum(1 for module in model.modules() if isinstance(module, torch.nn.Conv2d) and _large_pointwise(module))
