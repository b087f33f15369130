"""Global average pooling whose gradient keeps the input's memory layout.

The image-level branch of ASPP (DeepLab v3, v3+) and of the pyramid pooling module averages
the whole map to one pixel. `nn.AdaptiveAvgPool2d(1)`'s backward hands back an NCHW gradient
whatever the input's layout, and the map's other branches hand back channels-last ones: their
sum, and every operator after it in the backward pass, then mix the two layouts. Adding an
NCHW to a channels-last 4 x 2048 x 64 x 64 map (DeepLabV3-R50's ASPP input at batch 4, 512 x
512) took 127-145 ms against 12-14 ms for two channels-last ones; copying the NCHW gradient
to channels last first took as long as the mixed addition. The gradient of a mean is the
upstream value spread evenly, so it is written once, straight into the input's layout.
"""
from __future__ import annotations

from typing import Any

import torch

from seglab.ops.grad_mode import records_gradients
from seglab.ops.layout import memory_format_of

__all__ = ["global_average_pool"]


class _GlobalAveragePool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.memory_format = x.shape, memory_format_of(x)
        return x.mean((2, 3), keepdim=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        height, width = ctx.shape[-2:]
        return (grad / (height * width)).expand(ctx.shape).contiguous(memory_format=ctx.memory_format)


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """The mean of each channel of an N x C x H x W map, as N x C x 1 x 1 (what
    `nn.AdaptiveAvgPool2d(1)` computes); its gradient comes back in x's memory layout."""
    if not records_gradients(x):
        return x.mean((2, 3), keepdim=True)
    return _GlobalAveragePool.apply(x)
