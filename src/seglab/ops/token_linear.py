"""A linear layer over tokens, plus a residual, by the native register-blocked products for CPU
inference (`seglab.ops.native.linear`).

The Mix Transformer's attention projections map 32-160 channels to as many: PyTorch's linear
layer ran those products at a third of the float32 peak (MiT-B0's first stage at batch 8: 2.7 ms
for 0.27 GFLOP), and the residual addition after the output projection was one more pass over
the tokens. The native kernel takes both in one pass (1.8x on 32 and 64 channels, 1.2x on 160).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.ops import native
from seglab.ops.grad_mode import records_gradients
from seglab.ops.kept import KeptFromWeights

__all__ = ["linear_fits", "token_linear"]


def linear_fits(tokens: torch.Tensor, layer: nn.Linear, residual: torch.Tensor | None = None) -> bool:
    """Whether `token_linear` computes `layer` natively for `tokens`: float32 CPU inference (no
    gradient recorded), a bias, outputs in whole vectors, the native kernels built."""
    return (tokens.device.type == "cpu" and tokens.dtype == torch.float32 and layer.bias is not None
            and layer.weight.dtype == torch.float32 and layer.weight.device.type == "cpu"
            and layer.out_features % native.MIX_FFN_CHANNELS_MULTIPLE == 0
            and (residual is None or (residual.shape == (*tokens.shape[:-1], layer.out_features)
                                      and residual.dtype == torch.float32 and residual.device.type == "cpu"))
            and not records_gradients(tokens, layer.weight, layer.bias, residual) and native.available())


def token_linear(layer: nn.Linear, tokens: torch.Tensor, kept: KeptFromWeights[torch.Tensor], *, natively: bool,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """`layer(tokens) (+ residual)`: by `native.linear` where `natively` and `linear_fits` (the
    transposed weight built once in `kept`), else by PyTorch's operators."""
    if natively and linear_fits(tokens, layer, residual):
        weight_t = kept.get([layer.weight], lambda: layer.weight.detach().t().contiguous())
        return native.linear(tokens.contiguous(), weight_t, layer.bias.detach(),
                             residual=None if residual is None else residual.contiguous())
    out = layer(tokens)
    return out if residual is None else residual + out
