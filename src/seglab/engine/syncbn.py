"""Batch normalisation over the global batch of a multi-process job, on any backend.

torch's SyncBatchNorm runs only on CUDA; this version also works with gloo on the CPU. Each
process sums x and x^2 per channel over its part of the batch; one differentiable all-reduce
gives the global mean and variance, so gradients flow through the statistics exactly as in
single-process BatchNorm on the whole batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_reduce

__all__ = ["GlobalBatchNorm2d", "convert_sync_batchnorm"]


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics span every process of the default group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        local_count = torch.full((1,), x.numel() / channels, dtype=torch.float64, device=x.device)
        x64 = x.double()  # sum of squares minus squared sum cancels badly in float32
        stats = all_reduce(torch.cat([x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)), local_count]))
        count = stats[-1]
        mean = stats[:channels] / count
        var = (stats[channels : 2 * channels] / count - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype)[None, :, None, None]) * scale[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm2d of `module` made global: torch's SyncBatchNorm on CUDA, ours elsewhere."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        converted = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device_type))
    return module
