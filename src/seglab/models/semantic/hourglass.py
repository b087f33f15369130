"""Stacked Hourglass Networks (Newell, Yang & Deng, ECCV 2016 "Stacked Hourglass Networks for
Human Pose Estimation"), Fig. 3 and 4, used here for dense per-pixel labels.

Residual module: pre-activation bottleneck (BN-ReLU-1x1 to half the channels, BN-ReLU-3x3,
BN-ReLU-1x1 back) with a 1x1 projection on the skip when the width changes. An hourglass of
order n: an upper skip branch (a residual module at full resolution) and a lower branch
(max-pool, residual, hourglass of order n-1 or a residual module, residual, nearest x2
upsampling); the two are added. The stem (7x7 conv stride 2, residual, max-pool, residuals)
brings the image to stride 4. Stacks are chained: each predicts class scores (intermediate
supervision) that are mapped back by a 1x1 conv and added to the features fed to the next
stack. In training the model returns {"out": last stack, "aux": [earlier stacks]}.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.models.registry import register_model
from seglab.ops.conv import ConvNormAct
from seglab.ops.padding import crop_to, pad_to_multiple
from seglab.ops.upsample import make_upsample

__all__ = ["StackedHourglass", "hourglass"]


class Residual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.body = nn.Sequential(
            # Not in place: the un-activated input is still needed by the skip branch.
            nn.BatchNorm2d(in_channels), nn.ReLU(inplace=False), nn.Conv2d(in_channels, half, 1),
            nn.BatchNorm2d(half), nn.ReLU(inplace=True), nn.Conv2d(half, half, 3, padding=1),
            nn.BatchNorm2d(half), nn.ReLU(inplace=True), nn.Conv2d(half, out_channels, 1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Hourglass(nn.Module):
    def __init__(self, order: int, channels: int, upsample: str) -> None:
        super().__init__()
        self.upper = Residual(channels, channels)
        self.pool = nn.MaxPool2d(2, 2)
        self.down = Residual(channels, channels)
        self.inner = Hourglass(order - 1, channels, upsample) if order > 1 else Residual(channels, channels)
        self.up_residual = Residual(channels, channels)
        self.up = make_upsample(upsample, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lower = self.up_residual(self.inner(self.down(self.pool(x))))
        return self.upper(x) + self.up(lower, size=x.shape[-2:])


class StackedHourglass(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, channels: int = 256, stacks: int = 2,
                 order: int = 4, upsample: str = "nearest") -> None:
        super().__init__()
        if stacks < 1 or order < 1:
            raise ValueError(f"hourglass needs stacks >= 1 and order >= 1, got stacks={stacks}, order={order}")
        self.multiple = 4 * 2**order
        self.stem = nn.Sequential(
            ConvNormAct(in_channels, channels // 4, 7, stride=2),
            Residual(channels // 4, channels // 2),
            nn.MaxPool2d(2, 2),
            Residual(channels // 2, channels // 2),
            Residual(channels // 2, channels),
        )
        self.hourglasses = nn.ModuleList(Hourglass(order, channels, upsample) for _ in range(stacks))
        self.features = nn.ModuleList(
            nn.Sequential(Residual(channels, channels), ConvNormAct(channels, channels, 1)) for _ in range(stacks)
        )
        self.scores = nn.ModuleList(nn.Conv2d(channels, num_classes, 1) for _ in range(stacks))
        self.merge_features = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(stacks - 1))
        self.merge_scores = nn.ModuleList(nn.Conv2d(num_classes, channels, 1) for _ in range(stacks - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | list[torch.Tensor]]:
        size = x.shape[-2:]
        x = pad_to_multiple(x, self.multiple)
        padded = x.shape[-2:]
        y = self.stem(x)
        predictions = []
        for i, (hourglass, features, score) in enumerate(zip(self.hourglasses, self.features, self.scores)):
            feature = features(hourglass(y))
            prediction = score(feature)
            predictions.append(crop_to(F.interpolate(prediction, size=padded, mode="bilinear", align_corners=False), size))
            if i < len(self.merge_features):
                y = y + self.merge_features[i](feature) + self.merge_scores[i](prediction)
        if self.training and len(predictions) > 1:
            return {"out": predictions[-1], "aux": predictions[:-1]}
        return predictions[-1]


@register_model("hourglass", paper="Newell et al., ECCV 2016")
def hourglass(*, num_classes: int, in_channels: int = 3, channels: int = 256, stacks: int = 2, order: int = 4,
              upsample: str = "nearest") -> nn.Module:
    """Stacked Hourglass: residual modules, symmetric hourglasses, intermediate supervision."""
    return StackedHourglass(num_classes, in_channels, channels, stacks, order, upsample)
