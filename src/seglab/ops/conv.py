"""Convolution blocks shared by the architectures."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.ops.atrous_depthwise import AtrousDepthwiseConv2d
from seglab.ops.atrous_gemm import AtrousConv2d


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
    """Conv2d -> normalisation -> activation; the bias is dropped when a norm follows.
    `conv` is the convolution's class (an nn.Conv2d subclass taking the same arguments)."""

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
        conv: type[nn.Conv2d] = nn.Conv2d,
    ) -> None:
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        has_norm = norm not in (None, "none")
        super().__init__(
            conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=not has_norm),
            norm_layer(norm, out_channels),
            act(inplace=True) if act is not None else nn.Identity(),
        )


class SeparableConvNormAct(nn.Sequential):
    """Depthwise-separable convolution (Chollet, CVPR 2017 "Xception"; used in DeepLabv3+'s
    ASPP and decoder): a per-channel spatial kxk convolution, then a 1x1 pointwise one mixing
    channels, then norm and activation — about k*k times fewer weights than a full conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        norm: str | None = "batch",
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        has_norm = norm not in (None, "none")
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            # Dilated: the same convolution, as shifted windows where those are the faster.
            AtrousDepthwiseConv2d(in_channels, kernel_size, dilation) if dilation > 1 else
            nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=not has_norm),
            norm_layer(norm, out_channels),
            act(inplace=True) if act is not None else nn.Identity(),
        )


def atrous_conv(in_channels: int, out_channels: int, rate: int, norm: str | None = "batch") -> ConvNormAct:
    """3x3 atrous (dilated) convolution (Chen et al., "DeepLab", TPAMI 2017): the kernel's taps are
    `rate` pixels apart, so the field of view grows to 2*rate+1 with no extra weights and no loss
    of resolution; padding = rate keeps the map size. (`AtrousConv2d` trains large rates faster.)"""
    return ConvNormAct(in_channels, out_channels, 3, padding=rate, dilation=rate, norm=norm, conv=AtrousConv2d)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 Conv2d (same parameters and state dict) that trains on the CPU as a matrix product
    over the pixels. oneDNN's bf16 weight-gradient kernel for a 1x1 convolution with many input
    channels and few outputs corrupts the heap (PyTorch 2.14.1 on a Xeon with AMX: 4096 -> 6 or
    3000 -> 6 aborts with "free(): invalid next size"; 2048 -> 6 and 4096 -> 16 do not), which
    FCN's class scoring of VGG's 4096-channel fc7 hits; the matrix product takes another kernel.
    Inference and other devices get the plain convolution."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled() and x.dim() == 4:
            pixels = x.permute(0, 2, 3, 1)  # N H W C: the product runs along the channels
            return F.linear(pixels, self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return self._conv_forward(x, self.weight, self.bias)
