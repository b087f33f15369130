"""HRNetV2 for semantic segmentation (Wang et al., TPAMI 2020 "Deep High-Resolution
Representation Learning for Visual Recognition", Fig. 2 and Fig. 4(b)).

The backbone keeps a high-resolution stream (stride 4) from start to end and adds a lower
resolution stream at each new stage (strides 8, 16, 32); exchange units repeatedly fuse all
streams (strided 3x3 convs downwards, 1x1 conv + upsampling upwards). It is timm's HRNet
(`hrnet_w18`, `hrnet_w32`, `hrnet_w48`, `hrnet_w18_small`, ...), read at its four stream outputs.
The HRNetV2 head upsamples the four streams to stride 4, concatenates them, mixes them with a
1x1 conv + BN + ReLU, classifies with a 1x1 conv and upsamples x4 bilinearly.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.encoders.timm import TimmEncoder
from seglab.models.registry import register_model
from seglab.ops.conv import ConvNormAct
from seglab.ops.gradient_layout import contiguous_gradient
from seglab.ops.padding import crop_to, pad_to_multiple
from seglab.ops.upsample import make_upsample, upsample_scores

__all__ = ["HRNetSeg", "hrnet"]


class HRNetSeg(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, upsample: str = "bilinear") -> None:
        super().__init__()
        self.encoder = encoder
        streams = [i for i, s in enumerate(encoder.strides) if s >= 4]
        self.streams = streams
        channels = sum(encoder.channels[i] for i in streams)
        self.ups = nn.ModuleList(make_upsample(upsample, encoder.channels[i]) for i in streams[1:])
        self.mix = ConvNormAct(channels, channels, 1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = pad_to_multiple(x, 32)
        features = self.encoder(x)
        high = features[self.streams[0]]
        # Contiguous gradients for the upsamplings' backward (the concatenation hands back slices).
        upsampled = [contiguous_gradient(up(features[i], size=high.shape[-2:])) for up, i in zip(self.ups, self.streams[1:])]
        logits = self.classifier(self.mix(torch.cat([high, *upsampled], dim=1)))
        return crop_to(upsample_scores(logits, x.shape[-2:]), size)


@register_model("hrnet", paper="Wang et al., TPAMI 2020")
def hrnet(*, num_classes: int, in_channels: int = 3, encoder: str = "hrnet_w18", encoder_weights: str | None = None,
          upsample: str = "bilinear") -> nn.Module:
    """HRNetV2: parallel high-to-low streams with repeated fusion, upsample-and-concatenate head."""
    if not encoder.startswith("hrnet"):
        raise ValueError(f"the hrnet model needs an HRNet encoder (hrnet_w18, hrnet_w32, ...), not {encoder!r}")
    # feature_location="" reads the streams themselves, not timm's classification-head increments.
    backbone = TimmEncoder(encoder, in_channels, weights=encoder_weights, feature_location="")
    return HRNetSeg(backbone, num_classes, upsample)
