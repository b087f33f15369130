"""Convolution blocks shared by the architectures."""
from __future__ import annotations

import torch.nn as nn


def norm_layer(kind: str | None, channels: int) -> nn.Module:
    """`"batch"`, `"group"` (32 groups or fewer), `"instance"` or `None` (identity)."""
    if kind is None or kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"unknown norm {kind!r}; use batch, group, instance or none")


class ConvNormAct(nn.Sequential):
    """Conv2d -> normalisation -> activation; the bias is dropped when a norm follows."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        norm: str | None = "batch",
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        has_norm = norm not in (None, "none")
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=not has_norm),
            norm_layer(norm, out_channels),
            act(inplace=True) if act is not None else nn.Identity(),
        )
