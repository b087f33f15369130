"""PSPNet (Zhao, Shi, Qi, Wang & Jia, CVPR 2017 "Pyramid Scene Parsing Network"), Fig. 3.

A dilated ResNet (output stride 8) gives the feature map; the pyramid pooling module pools it
into 1x1, 2x2, 3x3 and 6x6 grids, reduces each to 1/4 of the channels with a 1x1 conv,
upsamples and concatenates them with the map itself; a 3x3 conv (512) and a 1x1 conv give the
class scores, bilinearly upsampled to the input size. During training an auxiliary head on the
stride-16 stage (res4b22 in the paper, Sec. 3.4) adds deep supervision: the model then
returns {"out": logits, "aux": [aux_logits]} and the trainer weights the aux loss (0.4).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.encoders import create_encoder
from seglab.models.registry import register_model
from seglab.ops.context import PyramidPooling
from seglab.ops.conv import ConvNormAct
from seglab.ops.padding import crop_to, pad_to_multiple
from seglab.ops.upsample import upsample_scores

__all__ = ["PSPNet", "pspnet"]


def classifier_head(in_channels: int, hidden: int, num_classes: int, dropout: float = 0.1) -> nn.Sequential:
    return nn.Sequential(ConvNormAct(in_channels, hidden, 3), nn.Dropout2d(dropout), nn.Conv2d(hidden, num_classes, 1))


class PSPNet(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, bins: tuple[int, ...] = (1, 2, 3, 6), aux: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.ppm = PyramidPooling(encoder.channels[-1], bins)
        self.head = classifier_head(self.ppm.out_channels, 512, num_classes)
        self.aux_head = classifier_head(encoder.channels[-2], 256, num_classes) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        size = x.shape[-2:]
        x = pad_to_multiple(x, 32)
        features = self.encoder(x)
        logits = self._to_input(self.head(self.ppm(features[-1])), x, size)
        if self.training and self.aux_head is not None:
            return {"out": logits, "aux": [self._to_input(self.aux_head(features[-2]), x, size)]}
        return logits

    @staticmethod
    def _to_input(logits: torch.Tensor, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return crop_to(upsample_scores(logits, x.shape[-2:]), size)


@register_model("pspnet", paper="Zhao et al., CVPR 2017")
def pspnet(*, num_classes: int, in_channels: int = 3, encoder: str = "resnet50", encoder_weights: str | None = None,
           output_stride: int = 8, aux: bool = True) -> nn.Module:
    """PSPNet: dilated ResNet, pyramid pooling 1/2/3/6, auxiliary head on the stride-16 stage."""
    backbone = create_encoder(encoder, in_channels=in_channels, output_stride=output_stride, weights=encoder_weights)
    return PSPNet(backbone, num_classes, aux=aux)
