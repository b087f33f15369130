"""Any seglab encoder + a feature pyramid (Lin et al. 2017, "Feature Pyramid Networks for Object Detection").

The detection heads of Mask R-CNN and YOLACT read a dict of same-width maps, one per pyramid
level, and the width as ``out_channels`` (torchvision's detection convention). This adapter
takes the encoder stages from ``min_stride`` on (C2..C5 for Mask R-CNN, C3..C5 for YOLACT),
runs torchvision's FPN (lateral 1x1 convs, top-down nearest upsampling and sum, 3x3 output convs)
and adds the coarser levels the paper's detector needs: a stride-2 max pool (P6, Mask R-CNN's
RPN) or two stride-2 convs (P6, P7, as RetinaNet and YOLACT do).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

__all__ = ["EncoderFPN", "encoder_fpn"]


class Float32P6P7(LastLevelP6P7):
    """RetinaNet's P6/P7 (two stride-2 3x3 convs), always in float32.

    Under CPU bf16 autocast, oneDNN's weight gradient of these stride-2 convs on the one- or
    two-pixel maps of small inputs came back NaN at random (uninitialised memory: the same step
    gave NaN or not from run to run), poisoning every parameter; the maps are tiny, so float32
    costs nothing measurable.
    """

    def forward(self, p: list[torch.Tensor], c: list[torch.Tensor], names: list[str]):
        with torch.autocast(p[-1].device.type, enabled=False):
            return super().forward([t.float() for t in p], [t.float() for t in c], names)


class EncoderFPN(nn.Module):
    """Encoder -> FPN levels ``{"0": P_first, ..., "pool" or "p6"/"p7": extra}`` of ``out_channels`` each."""

    def __init__(self, encoder: nn.Module, out_channels: int = 256, min_stride: int = 4, extra: str = "maxpool") -> None:
        super().__init__()
        stages = [i for i, s in enumerate(encoder.strides) if s >= min_stride]
        if len(stages) < 2:
            raise ValueError(f"encoder has strides {list(encoder.strides)}; an FPN needs two stages of stride >= {min_stride}")
        self.encoder = encoder
        self.stages = stages
        self.strides = [encoder.strides[i] for i in stages]
        if extra == "maxpool":
            extra_blocks = LastLevelMaxPool()
        elif extra == "p6p7":
            extra_blocks = Float32P6P7(out_channels, out_channels)
        else:
            raise ValueError(f"extra must be 'maxpool' or 'p6p7', not {extra!r}")
        self.fpn = FeaturePyramidNetwork([encoder.channels[i] for i in stages], out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.encoder(x)
        return self.fpn(OrderedDict((str(level), features[i]) for level, i in enumerate(self.stages)))


def encoder_fpn(encoder: str, *, in_channels: int, encoder_weights: str | None, out_channels: int, min_stride: int, extra: str) -> EncoderFPN:
    """Build a seglab encoder by name (any of ``seglab.encoders``) and put an FPN on it."""
    from seglab.encoders import create_encoder

    return EncoderFPN(create_encoder(encoder, in_channels=in_channels, weights=encoder_weights), out_channels, min_stride, extra)
