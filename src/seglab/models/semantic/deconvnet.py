"""DeconvNet (Noh, Hong & Han, ICCV 2015 "Learning Deconvolution Network for Semantic
Segmentation"), Fig. 2.

A VGG16 convolution network with batch norm after every layer, fc6 (7x7, 4096) and fc7 (1x1,
4096) as convolutions, then a deconvolution network that mirrors it: a 7x7 deconvolution
undoing fc6, and for each VGG stage, from the deepest, an unpooling with the stored max-pooling
indices followed by 3x3 deconvolutions (transposed convs) mirroring the stage's convolutions.
A 1x1 convolution gives the class scores.

The paper's fc6 is an unpadded 7x7 conv that turns a 7x7 map into 1x1 (224 px input) and its
7x7 deconvolution turns it back; here both are padded by 3, which keeps the weights identical
and lets any input size through.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.encoders.vgg import VGG16Encoder
from seglab.encoders.weights import load_weights_file
from seglab.models.registry import register_model
from seglab.models.semantic.segnet import mirrored_decoder_widths
from seglab.ops.conv import ConvNormAct, norm_layer
from seglab.ops.padding import crop_to, pad_to_multiple
from seglab.ops.upsample import make_upsample

__all__ = ["DeconvNet", "deconvnet"]


class DeconvNormAct(nn.Sequential):
    """Transposed convolution (stride 1, so it keeps the size) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            norm_layer("batch", out_channels),
            nn.ReLU(inplace=True),
        )


class DeconvNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.encoder = VGG16Encoder(in_channels, batch_norm=True, width=width)
        top, fc = self.encoder.channels[-1], self.encoder.fc_channels
        self.fc6 = ConvNormAct(top, fc, 7)
        self.fc7 = ConvNormAct(fc, fc, 1)
        self.deconv_fc6 = DeconvNormAct(fc, top, 7)
        self.unpools = nn.ModuleList()
        self.deconvs = nn.ModuleList()
        for convs in mirrored_decoder_widths(width):
            self.unpools.append(make_upsample("max_unpool", convs[0][0], convs[0][0], 2))
            self.deconvs.append(nn.Sequential(*(DeconvNormAct(cin, cout) for cin, cout in convs)))
        self.score = nn.Conv2d(self.encoder.channels[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = pad_to_multiple(x, 32)
        features, indices, sizes = self.encoder.forward_with_indices(x)
        x = self.deconv_fc6(self.fc7(self.fc6(features[-1])))
        for unpool, stage, where, before in zip(self.unpools, self.deconvs, reversed(indices), reversed(sizes)):
            x = stage(unpool(x, size=before, indices=where))
        return crop_to(self.score(x), size)


@register_model("deconvnet", paper="Noh et al., ICCV 2015")
def deconvnet(*, num_classes: int, in_channels: int = 3, encoder_weights: str | None = None,
              width: float = 1.0) -> nn.Module:
    """DeconvNet: VGG16 + fc6/fc7, mirrored unpooling + deconvolution network."""
    model = DeconvNet(num_classes, in_channels, width)
    if encoder_weights is not None:
        load_weights_file(model.encoder, encoder_weights, first_conv="stages.0.0.0.weight")
    return model
