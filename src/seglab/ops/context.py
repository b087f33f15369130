"""Multi-scale context modules: atrous spatial pyramid pooling and the pyramid pooling module.

Both have an image-level (1x1) pooled branch. Batch normalisation of a 1x1 map is undefined
for a batch of one in training, so that branch normalises *after* broadcasting back to the map
size: for a batch > 1 the statistics are the same (each sample's value is only repeated), and in
eval mode the result is identical, since BN is a per-channel affine map there.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.ops.atrous_gemm import AtrousConv2d
from seglab.ops.conv import ConvNormAct, SeparableConvNormAct, norm_layer
from seglab.ops.global_pool import global_average_pool
from seglab.ops.gradient_layout import contiguous_gradient
from seglab.ops.layout import in_layout_of

__all__ = ["ASPP", "PyramidPooling"]


class PooledBranch(nn.Module):
    """Average-pool to `bins` x `bins`, 1x1 conv, norm, ReLU, resize back (for bins == 1 the
    norm and ReLU come after the resize; see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, bins: int, norm: str | None = "batch") -> None:
        super().__init__()
        has_norm = norm not in (None, "none")
        self.pool = nn.AdaptiveAvgPool2d(bins)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=not has_norm)
        self.norm = norm_layer(norm, out_channels)
        self.act = nn.ReLU(inplace=True)

        self.global_pool = bins == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The global pool's gradient in x's layout (see seglab.ops.global_pool).
        pooled = self.conv(global_average_pool(x) if self.global_pool else self.pool(x))
        if self.global_pool:
            # In x's memory layout: an NCHW branch among channels-last ones makes the
            # concatenation NCHW, and the next convolution copies it back (4 ms in bf16 for
            # DeepLabV3+-R34's 1280 x 32 x 32 at 512 x 512, about 4% of the forward).
            return self.act(self.norm(in_layout_of(pooled.expand(-1, -1, *x.shape[-2:]), x)))
        pooled = self.act(self.norm(pooled))
        # Concatenated next: a contiguous gradient for the upsampling's backward.
        return contiguous_gradient(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling with image-level features (Chen et al., arXiv 2017
    "Rethinking Atrous Convolution", DeepLabv3, Fig. 5): a 1x1 conv, three 3x3 atrous convs at
    `rates`, and global average pooling, concatenated and projected by a 1x1 conv.
    `separable=True` gives DeepLabv3+'s depthwise-separable branches (Chen et al., ECCV 2018)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: tuple[int, ...] | list[int] = (6, 12, 18),
        separable: bool = False,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.rates = tuple(rates)
        branches: list[nn.Module] = [ConvNormAct(in_channels, out_channels, 1)]
        for rate in self.rates:
            if separable:
                branches.append(SeparableConvNormAct(in_channels, out_channels, 3, dilation=rate))
            else:
                branches.append(ConvNormAct(in_channels, out_channels, 3, dilation=rate, conv=AtrousConv2d))
        branches.append(PooledBranch(in_channels, out_channels, bins=1))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            ConvNormAct(len(branches) * out_channels, out_channels, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class PyramidPooling(nn.Module):
    """Pyramid pooling module (Zhao et al., CVPR 2017 "PSPNet", Fig. 3): average pooling into
    `bins` x `bins` grids (1, 2, 3, 6), a 1x1 conv reducing each to 1/len(bins) of the input
    channels, upsampling, and concatenation with the input (so the output has 2x channels)."""

    def __init__(self, in_channels: int, bins: tuple[int, ...] | list[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        reduced = in_channels // len(bins)
        self.stages = nn.ModuleList(PooledBranch(in_channels, reduced, b) for b in bins)
        self.out_channels = in_channels + reduced * len(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [stage(x) for stage in self.stages], dim=1)
