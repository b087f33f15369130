"""SegFormer's Mix-FFN (Linear, 3x3 depthwise conv, GELU, Linear) in one native pass for CPU
inference (`seglab.ops.native.mix_ffn`), with the LayerNorm before it and the residual addition
after it.

Run as four PyTorch operators, the block writes fc1's and the convolution's outputs, four times
the tokens' channels each, through memory and reads them back (67 MB each in MiT-B0's first
stage at batch 8 on 512 x 512), and the linear layers' few-channel products run well below the
processor's rate. The native kernel keeps three rows of fc1's output in a core's cache and
computes the block row by row; the LayerNorm before it and the residual addition after it, two
more passes over the tokens in PyTorch, come for free.

In bf16 (where the processor has AVX-512 BF16) the linear layers multiply bf16 pairs; the norm,
the depthwise convolution and GELU run in float32 on the rows in cache, and the block's output is
rounded to bf16 once. Against the bf16 fast path's operators (MiT-B0 at 512 x 512, Zen 4):
1.46-1.55x on the first stage, 1.13-1.22x on the second and third, 0.88-1.02x on the fourth,
which therefore keeps its operators as in float32 (`seglab.engine.fastpath.native_mix_ffn_pays`).
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
                            and norm.weight is not None and norm.bias is not None)


def _native_dtype(dtype: torch.dtype) -> bool:
    """float32, or bf16 where the processor multiplies bf16 by pairs (AVX-512 BF16)."""
    return native.available() if dtype == torch.float32 else dtype == torch.bfloat16 and native.bf16_pairs()


def mix_ffn_fits(tokens: torch.Tensor, fc1: nn.Linear, dwconv: nn.Conv2d, act: nn.Module, fc2: nn.Linear,
                 norm: nn.Module | None = None, residual: torch.Tensor | None = None) -> bool:
    """Whether `native_mix_ffn` computes this block (after `norm`, plus `residual`, if given) for
    `tokens`: float32 CPU inference (no gradient recorded), or bf16 on a processor with AVX-512
    BF16's pair products, tokens, residual and parameters of one dtype; the native kernels built,
    the exact GELU, biases everywhere, an affine LayerNorm over the channels, a residual of the
    tokens' shape, and channel counts in whole vectors (every MiT's are)."""
    parameters = _parameters(fc1, dwconv, fc2)
    if norm is not None:
        parameters += [p for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)) if p is not None]
    return (tokens.device.type == "cpu" and tokens.dim() == 3
            and all(p is not None and p.dtype == tokens.dtype and p.device.type == "cpu" for p in parameters)
            and (residual is None or (residual.shape == tokens.shape and residual.dtype == tokens.dtype
                                      and residual.device.type == "cpu"))
            and not records_gradients(tokens, residual, *parameters)
            and isinstance(act, nn.GELU) and act.approximate == "none"
            and dwconv.kernel_size == (3, 3) and dwconv.padding == (1, 1) and dwconv.stride == (1, 1)
            and dwconv.dilation == (1, 1) and dwconv.groups == dwconv.in_channels == dwconv.out_channels
            and dwconv.padding_mode == "zeros" and _norm_fits(norm, fc1.in_features)
            and fc1.in_features % native.MIX_FFN_CHANNELS_MULTIPLE == 0
            and fc1.out_features % native.MIX_FFN_CHANNELS_MULTIPLE == 0
            and _native_dtype(tokens.dtype))


def native_mix_ffn(tokens: torch.Tensor, height: int, width: int, fc1: nn.Linear, dwconv: nn.Conv2d, fc2: nn.Linear,
                   kept: KeptFromWeights[NativeWeights], residual: torch.Tensor | None = None,
                   norm: nn.LayerNorm | None = None) -> torch.Tensor:
    """`fc2(GELU(dwconv(fc1(norm(tokens)) as a height x width map))) (+ residual)` by the native
    kernel, for inputs `mix_ffn_fits` takes; the weights in the kernel's layout are built once
    in `kept`."""
    hidden = fc1.out_features

    bf16 = tokens.dtype == torch.bfloat16

    def matrix(layer: nn.Linear) -> torch.Tensor:  # transposed; in bf16 as the pair products read it
        weight_t = layer.weight.detach().t()
        return native.pair_rows(weight_t) if bf16 else weight_t.contiguous()

    def layout() -> NativeWeights:  # the rest float32 (in bf16, the block's own arithmetic is)
        return (matrix(fc1), fc1.bias.detach().float().contiguous(),
                dwconv.weight.detach().reshape(hidden, 9).t().float().contiguous(),
                dwconv.bias.detach().float().contiguous(), matrix(fc2), fc2.bias.detach().float().contiguous())

    weights = kept.get(_parameters(fc1, dwconv, fc2), layout)
    norms = {} if norm is None else {"norm_weight": norm.weight.detach().float().contiguous(),
                                     "norm_bias": norm.bias.detach().float().contiguous(), "eps": norm.eps}
    return native.mix_ffn(tokens.contiguous(), height, width, *weights, **norms,
                          residual=None if residual is None else residual.contiguous())
