"""SegFormer's Mix-FFN (Linear, 3x3 depthwise conv, GELU, Linear) in one native pass for CPU
inference (`seglab.ops.native.mix_ffn`), with the LayerNorm before it and the residual addition
after it.

Run as four PyTorch operators, the block writes fc1's and the convolution's outputs, four times
the tokens' channels each, through memory and reads them back (67 MB each in MiT-B0's first
stage at batch 8 on 512 x 512), and the linear layers' few-channel products run well below the
processor's rate. The native kernel keeps three rows of fc1's output in a core's cache and
computes the block row by row; the LayerNorm before it and the residual addition after it, two
more passes over the tokens in PyTorch, come for free.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.ops import native
from seglab.ops.grad_mode import records_gradients
from seglab.ops.kept import KeptFromWeights

__all__ = ["NativeWeights", "mix_ffn_fits", "native_mix_ffn"]

NativeWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _parameters(fc1: nn.Linear, dwconv: nn.Conv2d, fc2: nn.Linear) -> list[torch.Tensor]:
    return [fc1.weight, fc1.bias, dwconv.weight, dwconv.bias, fc2.weight, fc2.bias]


def _norm_fits(norm: nn.Module | None, channels: int) -> bool:
    return norm is None or (isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (channels,)
                            and norm.weight is not None and norm.bias is not None
                            and norm.weight.dtype == torch.float32 and norm.bias.dtype == torch.float32)


def mix_ffn_fits(tokens: torch.Tensor, fc1: nn.Linear, dwconv: nn.Conv2d, act: nn.Module, fc2: nn.Linear,
                 norm: nn.Module | None = None, residual: torch.Tensor | None = None) -> bool:
    """Whether `native_mix_ffn` computes this block (after `norm`, plus `residual`, if given) for
    `tokens`: float32 CPU inference (no gradient recorded), the native kernels built, the exact
    GELU, biases everywhere, an affine LayerNorm over the channels, a residual of the tokens'
    shape, and channel counts in whole vectors (every MiT's are)."""
    parameters = _parameters(fc1, dwconv, fc2)
    if norm is not None:
        parameters += [p for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)) if p is not None]
    return (tokens.device.type == "cpu" and tokens.dtype == torch.float32 and tokens.dim() == 3
            and all(p is not None and p.dtype == torch.float32 and p.device.type == "cpu" for p in parameters)
            and (residual is None or (residual.shape == tokens.shape and residual.dtype == torch.float32
                                      and residual.device.type == "cpu"))
            and not records_gradients(tokens, residual, *parameters)
            and isinstance(act, nn.GELU) and act.approximate == "none"
            and dwconv.kernel_size == (3, 3) and dwconv.padding == (1, 1) and dwconv.stride == (1, 1)
            and dwconv.dilation == (1, 1) and dwconv.groups == dwconv.in_channels == dwconv.out_channels
            and dwconv.padding_mode == "zeros" and _norm_fits(norm, fc1.in_features)
            and fc1.in_features % native.MIX_FFN_CHANNELS_MULTIPLE == 0
            and fc1.out_features % native.MIX_FFN_CHANNELS_MULTIPLE == 0
            and native.available())


def native_mix_ffn(tokens: torch.Tensor, height: int, width: int, fc1: nn.Linear, dwconv: nn.Conv2d, fc2: nn.Linear,
                   kept: KeptFromWeights[NativeWeights], residual: torch.Tensor | None = None,
                   norm: nn.LayerNorm | None = None) -> torch.Tensor:
    """`fc2(GELU(dwconv(fc1(norm(tokens)) as a height x width map))) (+ residual)` by the native
    kernel, for inputs `mix_ffn_fits` takes; the weights in the kernel's layout are built once
    in `kept`."""
    hidden = fc1.out_features

    def layout() -> NativeWeights:
        return (fc1.weight.detach().t().contiguous(), fc1.bias.detach().contiguous(),
                dwconv.weight.detach().reshape(hidden, 9).t().contiguous(), dwconv.bias.detach().contiguous(),
                fc2.weight.detach().t().contiguous(), fc2.bias.detach().contiguous())

    weights = kept.get(_parameters(fc1, dwconv, fc2), layout)
    norms = {} if norm is None else {"norm_weight": norm.weight.detach().contiguous(),
                                     "norm_bias": norm.bias.detach().contiguous(), "eps": norm.eps}
    return native.mix_ffn(tokens.contiguous(), height, width, *weights, **norms,
                          residual=None if residual is None else residual.contiguous())
