"""The middle of SegFormer's Mix-FFN in training, `GELU(dwconv3x3(fc1's tokens))`, forward and
backward by one native kernel each (`seglab.ops.native.depthwise_gelu`).

PyTorch runs it as four passes over fc1's output, four times the tokens' channels wide: the
depthwise convolution (on the tokens as a channels-last map), GELU, and their two backward
kernels, the convolution's backward well below the memory's rate. The native forward computes
the convolution and GELU in one pass and keeps the convolution's output (rounded to the tokens'
dtype, as autocast keeps GELU's input); the backward takes GELU's slope and the convolution's
three gradients in one pass, with three rows of the gradient through GELU in a core's cache.
The weights and all arithmetic stay float32 (autocast would round the weights to bf16).
MiT-B0's four stages, batch 4 at 512 x 512, bf16, forward + backward of one block against
PyTorch's four operators (Zen 4, 2 threads): 20.2-22.0 -> 11.5-13.6 ms on the first stage,
10.4-11.2 -> 5.4-6.2, 5.8-6.7 -> 3.4-3.7 and 2.3-3.5 -> 1.6-1.9 on the others; the
SegFormer-B0 training step 1.05-1.07x (docs/bench.md).

`depthwise_gelu_fits` says when a call qualifies: float32 or bf16 CPU tokens N x (H W) x D, D
a multiple of `native.MIX_FFN_CHANNELS_MULTIPLE`, a 3 x 3 depthwise convolution with zero
padding 1, stride 1 and a bias, the exact GELU, the native kernels built. SegFormer's Mix-FFN
takes it in CPU training where `seglab.engine.mix_ffn.training_mix_ffn` switches it on.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from seglab.ops import native

__all__ = ["depthwise_gelu_fits", "native_depthwise_gelu"]


def depthwise_gelu_fits(tokens: torch.Tensor, dwconv: nn.Conv2d, act: nn.Module) -> bool:
    """Whether `native_depthwise_gelu(tokens, ..., dwconv)` computes act(dwconv(tokens as a map))."""
    parameters = (dwconv.weight, dwconv.bias)
    return (tokens.device.type == "cpu" and tokens.dtype in (torch.float32, torch.bfloat16) and tokens.dim() == 3
            and all(p is not None and p.device.type == "cpu" and p.dtype == torch.float32 for p in parameters)
            and isinstance(act, nn.GELU) and act.approximate == "none"
            and dwconv.kernel_size == (3, 3) and dwconv.padding == (1, 1) and dwconv.stride == (1, 1)
            and dwconv.dilation == (1, 1) and dwconv.padding_mode == "zeros"
            and dwconv.groups == dwconv.in_channels == dwconv.out_channels == tokens.shape[-1]
            and tokens.shape[-1] % native.MIX_FFN_CHANNELS_MULTIPLE == 0 and native.available())


class _DepthwiseGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, height: int, width: int, weight: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        taps = weight.detach().reshape(weight.shape[0], 9).t().contiguous()  # 9 x D, tap by tap
        pre, out = native.depthwise_gelu(tokens, height, width, taps, bias.detach().contiguous())
        ctx.save_for_backward(tokens, pre, taps)
        ctx.size = (height, width)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None,
                                                       torch.Tensor | None]:
        tokens, pre, taps = ctx.saved_tensors
        grad_tokens, grad_taps, grad_bias = native.depthwise_gelu_backward(
            grad_out.to(tokens.dtype).contiguous(), pre, tokens, *ctx.size, taps)
        grad_weight = grad_taps.t().reshape(-1, 1, 3, 3)
        return (grad_tokens if ctx.needs_input_grad[0] else None, None, None,
                grad_weight if ctx.needs_input_grad[3] else None, grad_bias if ctx.needs_input_grad[4] else None)


def native_depthwise_gelu(tokens: torch.Tensor, height: int, width: int, dwconv: nn.Conv2d) -> torch.Tensor:
    """GELU(dwconv(tokens as a height x width map)) as tokens N x (height * width) x D in the
    tokens' dtype, by the native kernels forward and backward; for inputs `depthwise_gelu_fits`
    takes."""
    return _DepthwiseGelu.apply(tokens.contiguous(), height, width, dwconv.weight, dwconv.bias)
