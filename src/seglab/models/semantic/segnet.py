"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017 "SegNet: A Deep Convolutional
Encoder-Decoder Architecture for Image Segmentation"), Fig. 2.

The encoder is VGG16's 13 convolutional layers with batch norm (no fully connected layers).
The decoder mirrors it layer for layer: each stage first upsamples with the max-pooling
indices remembered by the matching encoder stage (max-unpooling: sparse maps, no learnt
upsampling weights and no skip concatenation), then densifies with 3x3 conv + BN + ReLU. The
last decoder convolution outputs the class scores. `upsample` swaps max-unpooling for any
other upsampler of `seglab.ops.upsample` for comparison; `width` scales the channels.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.encoders.vgg import VGG16_STAGES, VGG16Encoder
from seglab.encoders.weights import load_weights_file
from seglab.models.registry import register_model
from seglab.ops.conv import ConvNormAct
from seglab.ops.padding import crop_to, pad_to_multiple
from seglab.ops.upsample import make_upsample

__all__ = ["SegNet", "segnet"]


def mirrored_decoder_widths(width: float) -> list[list[tuple[int, int]]]:
    """(in, out) channels of each decoder conv, deepest stage first: the encoder read backwards,
    each stage ending with the width of the stage above it."""
    widths = [max(1, round(c * width)) for c, _ in VGG16_STAGES]
    stages = []
    for level in reversed(range(len(VGG16_STAGES))):
        convs = VGG16_STAGES[level][1]
        here = widths[level]
        above = widths[level - 1] if level > 0 else widths[0]
        stages.append([(here, here)] * (convs - 1) + [(here, above)])
    return stages


class SegNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0, upsample: str = "max_unpool") -> None:
        super().__init__()
        self.encoder = VGG16Encoder(in_channels, batch_norm=True, width=width)
        self.unpools = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level, convs in enumerate(mirrored_decoder_widths(width)):
            self.unpools.append(make_upsample(upsample, convs[0][0], convs[0][0], 2))
            last_stage = level == len(VGG16_STAGES) - 1
            layers = [ConvNormAct(cin, cout, 3) for cin, cout in convs[:-1]]
            cin, cout = convs[-1]
            layers.append(nn.Conv2d(cin, num_classes, 3, padding=1) if last_stage else ConvNormAct(cin, cout, 3))
            self.decoder.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = pad_to_multiple(x, 32)
        features, indices, sizes = self.encoder.forward_with_indices(x)
        x = features[-1]
        for unpool, stage, where, before in zip(self.unpools, self.decoder, reversed(indices), reversed(sizes)):
            x = stage(unpool(x, size=before, indices=where))
        return crop_to(x, size)


@register_model("segnet", paper="Badrinarayanan et al., TPAMI 2017")
def segnet(*, num_classes: int, in_channels: int = 3, encoder_weights: str | None = None, width: float = 1.0,
           upsample: str = "max_unpool") -> nn.Module:
    """SegNet: VGG16-BN encoder, mirrored decoder upsampling with max-pooling indices."""
    model = SegNet(num_classes, in_channels, width, upsample)
    if encoder_weights is not None:
        load_weights_file(model.encoder, encoder_weights, first_conv="stages.0.0.0.weight")
    return model
