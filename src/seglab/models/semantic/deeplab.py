"""DeepLab v2, v3 and v3+.

- v2 (Chen et al., TPAMI 2017 "DeepLab: Semantic Image Segmentation with Deep Convolutional
  Nets, Atrous Convolution, and Fully Connected CRFs", Fig. 7): a ResNet without its last two
  poolings (atrous, output stride 8); ASPP-L, four parallel 3x3 atrous convolutions at rates 6,
  12, 18, 24 each predicting class scores, summed; bilinear upsampling x8. Meant to be followed
  by the dense CRF (`seglab.crf`).
- v3 (Chen et al., arXiv 2017 "Rethinking Atrous Convolution for Semantic Image Segmentation",
  Fig. 5): ASPP with a 1x1 branch, three 3x3 atrous branches at rates 6/12/18 for output stride
  16 (doubled at 8) and image-level pooling, concatenated and projected by a 1x1 conv to 256;
  then a 3x3 conv and the 1x1 classifier, upsampled to input size.
- v3+ (Chen et al., ECCV 2018 "Encoder-Decoder with Atrous Separable Convolution", Fig. 2):
  v3's ASPP with depthwise-separable convolutions as the encoder head, upsampled x4 and
  concatenated with the stride-4 low-level features reduced to 48 channels by a 1x1 conv;
  a separable 3x3 conv refines, a 1x1 conv classifies, x4 bilinear returns to input size.
  The block layout (one separable conv after ASPP, one in the decoder) follows
  segmentation_models_pytorch's reference implementation, whose parameter count the tests match.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.encoders import create_encoder
from seglab.models.registry import register_model
from seglab.ops.atrous_gemm import AtrousConv2d
from seglab.ops.context import ASPP
from seglab.ops.conv import ConvNormAct, SeparableConvNormAct
from seglab.ops.gradient_layout import contiguous_gradient
from seglab.ops.padding import crop_to, pad_to_multiple
from seglab.ops.upsample import upsample_scores

__all__ = ["DeepLabV2", "DeepLabV3", "DeepLabV3Plus", "deeplabv2", "deeplabv3", "deeplabv3plus"]


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPPL(nn.Module):
    """DeepLab v2's ASPP-L: parallel atrous 3x3 classifiers whose score maps are summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(AtrousConv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


class DeepLabV2(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.encoder = encoder
        self.aspp = ASPPL(encoder.channels[-1], num_classes, rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = pad_to_multiple(x, 32)
        return crop_to(upsample_scores(self.aspp(self.encoder(x)[-1]), x.shape[-2:]), size)


class DeepLabV3(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, rates: tuple[int, ...], channels: int = 256) -> None:
        super().__init__()
        self.encoder = encoder
        self.aspp = ASPP(encoder.channels[-1], channels, rates)
        self.head = nn.Sequential(ConvNormAct(channels, channels, 3), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = pad_to_multiple(x, 32)
        return crop_to(upsample_scores(self.head(self.aspp(self.encoder(x)[-1])), x.shape[-2:]), size)


class DeepLabV3Plus(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, rates: tuple[int, ...], channels: int = 256,
                 low_level_channels: int = 48) -> None:
        super().__init__()
        if 4 not in encoder.strides:
            raise ValueError(f"DeepLabv3+ needs a stride-4 encoder map; this encoder has strides {encoder.strides}")
        self.encoder = encoder
        self.low_level = encoder.strides.index(4)
        self.aspp = nn.Sequential(
            ASPP(encoder.channels[-1], channels, rates, separable=True, dropout=0.5),
            SeparableConvNormAct(channels, channels, 3),
        )
        self.reduce = ConvNormAct(encoder.channels[self.low_level], low_level_channels, 1)
        self.refine = SeparableConvNormAct(channels + low_level_channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = pad_to_multiple(x, 32)
        features = self.encoder(x)
        low = self.reduce(features[self.low_level])
        # The concatenation's gradient slice, made contiguous, for the upsampling's backward.
        high = contiguous_gradient(_resize(self.aspp(features[-1]), low.shape[-2:]))
        logits = self.classifier(self.refine(torch.cat([high, low], dim=1)))
        return crop_to(upsample_scores(logits, x.shape[-2:]), size)


def _rates(output_stride: int, rates: tuple[int, ...] = (6, 12, 18)) -> tuple[int, ...]:
    # The paper's rates are for output stride 16; at stride 8 the same field of view needs twice the rate.
    return tuple(r * 16 // output_stride for r in rates)


@register_model("deeplabv2", paper="Chen et al., TPAMI 2017")
def deeplabv2(*, num_classes: int, in_channels: int = 3, encoder: str = "resnet101", encoder_weights: str | None = None,
              output_stride: int = 8) -> nn.Module:
    """DeepLab v2: atrous ResNet (stride 8), ASPP-L (rates 6/12/18/24) summed score maps, x8 bilinear."""
    backbone = create_encoder(encoder, in_channels=in_channels, output_stride=output_stride, weights=encoder_weights)
    return DeepLabV2(backbone, num_classes, tuple(r * 8 // output_stride for r in (6, 12, 18, 24)))


@register_model("deeplabv3", paper="Chen et al., arXiv 2017")
def deeplabv3(*, num_classes: int, in_channels: int = 3, encoder: str = "resnet101", encoder_weights: str | None = None,
              output_stride: int = 16) -> nn.Module:
    """DeepLab v3: atrous ResNet, ASPP (1x1, rates 6/12/18 at stride 16, image pooling)."""
    backbone = create_encoder(encoder, in_channels=in_channels, output_stride=output_stride, weights=encoder_weights)
    return DeepLabV3(backbone, num_classes, _rates(output_stride))


@register_model("deeplabv3plus", paper="Chen et al., ECCV 2018")
def deeplabv3plus(*, num_classes: int, in_channels: int = 3, encoder: str = "resnet101",
                  encoder_weights: str | None = None, output_stride: int = 16) -> nn.Module:
    """DeepLab v3+: separable ASPP encoder head, decoder fusing stride-4 low-level features."""
    backbone = create_encoder(encoder, in_channels=in_channels, output_stride=output_stride, weights=encoder_weights)
    return DeepLabV3Plus(backbone, num_classes, _rates(output_stride))
