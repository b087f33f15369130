"""VGG16 (Simonyan & Zisserman, ICLR 2015 "Very Deep Convolutional Networks"), configuration D,
as the encoder of FCN, SegNet and DeconvNet.

Five stages of 3x3 convolutions (2, 2, 3, 3, 3 of them; 64, 128, 256, 512, 512 channels), each
closed by a 2x2 max-pooling whose argmax `indices` SegNet and DeconvNet reuse to unpool. The
classifier's fully connected fc6/fc7 are kept as convolutions (FCN, Sec. 3.1): fc6 is a 7x7
conv with 4096 outputs, fc7 a 1x1 conv. fc6 is padded by 3 so that any input size works (the
paper instead pads the image by 100 pixels and crops). `width` scales every channel count
(1.0 is the paper's network; small values make quick tests).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.ops.conv import ConvNormAct

__all__ = ["VGG16Encoder", "VGG16_STAGES"]

VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG16Encoder(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        batch_norm: bool = False,
        with_fc: bool = False,
        width: float = 1.0,
        depth: int = 5,
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"VGG16 has 5 stages; depth must be 1..5, not {depth}")
        norm = "batch" if batch_norm else None
        self.stages = nn.ModuleList()
        self.channels: list[int] = []
        previous = in_channels
        for out, convs in VGG16_STAGES[:depth]:
            out = max(1, round(out * width))
            layers = [ConvNormAct(previous if i == 0 else out, out, 3, norm=norm) for i in range(convs)]
            self.stages.append(nn.Sequential(*layers))
            self.channels.append(out)
            previous = out
        self.strides: list[int] = [2 ** (i + 1) for i in range(depth)]
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.fc_channels = max(1, round(4096 * width))
        if with_fc:
            self.fc = nn.Sequential(
                nn.Conv2d(previous, self.fc_channels, 7, padding=3),  # fc6
                nn.ReLU(inplace=True),
                nn.Dropout2d(0.5),
                nn.Conv2d(self.fc_channels, self.fc_channels, 1),  # fc7
                nn.ReLU(inplace=True),
                nn.Dropout2d(0.5),
            )
        else:
            self.fc = None

    def forward_with_indices(
        self, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Size]]:
        """Pooled stage outputs, the pooling argmax indices, and each stage's size before pooling."""
        features, indices, sizes = [], [], []
        for stage in self.stages:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, where = self.pool(x)
            features.append(x)
            indices.append(where)
        return features, indices, sizes

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_with_indices(x)[0]
