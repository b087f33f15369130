"""Semantic FPN (Kirillov, Girshick, He & Dollar, CVPR 2019 "Panoptic Feature Pyramid
Networks", Fig. 3) on a Feature Pyramid Network (Lin et al., CVPR 2017, Fig. 3).

Top-down pathway: lateral 1x1 convolutions bring the encoder's maps at strides 4, 8, 16, 32
to 256 channels; from the deepest, each level is upsampled x2 and added to the next lateral.
Semantic head: each pyramid level goes through as many (3x3 conv 128, GroupNorm, ReLU, x2
upsampling) steps as it needs to reach stride 4 (one 3x3 conv for P2); the four maps are
summed, a 1x1 conv predicts the classes, and a x4 bilinear upsampling returns to input size.

With a fixed interpolation in the heads (bilinear, the default), the three deeper levels'
maps are summed at stride 8 and upsampled once: interpolation is linear and the same for
every level, so up(a) + up(b) + up(c) = up(a + b + c) up to float rounding, with two
upsamplings and two stride-4 additions fewer.

P2 = lateral(C2) + nearest_up(P3) is read by one 3x3 convolution only (the stride-4 head's), so
that convolution is computed without building P2: its kernel composed with the 1x1 lateral
reads C2 (64 channels on ResNet-34) directly, and the share of up(P3) is the 3x3 convolution of
a nearest-upsampled map, one stride-2 transposed convolution at stride 8
(`seglab.ops.nearest_conv`); the lateral's bias goes onto P3 (nearest upsampling repeats it,
and zero padding stays exact). FPN-R34 at 512 x 512: 51.5 GFLOPs instead of 54.9, and neither
the 256-channel stride-4 sum nor its upsampled term is written; only where it multiplies less
(C2 narrower than the pyramid, as ResNet-18/34's). Same function up to summation order.
Where the engine sets `winograd_tile` (float32 on the CPU, `seglab.engine.winograd`'s
`upsampling_output_tile`), that convolution goes by Winograd on the stride-4 grid instead, P3
upsampled in its tiles and C2 as the skip (`seglab.ops.winograd_nearest`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.encoders import create_encoder
from seglab.models.registry import register_model
from seglab.ops.conv import ConvNormAct
from seglab.ops.kept import KeptFromWeights
from seglab.ops.layout import in_layout_of
from seglab.ops.nearest_conv import UpsamplingConvCaller, nearest2x_transposed_weight
from seglab.ops.padding import crop_to, pad_to_multiple
from seglab.ops.upsample import make_upsample, upsample_scores

__all__ = ["FPN", "fpn"]


class LevelHead(nn.Module):
    """(3x3 conv, GN, ReLU, x2 upsample) repeated `steps` times; one conv when steps == 0."""

    def __init__(self, in_channels: int, out_channels: int, steps: int, upsample: str) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvNormAct(in_channels if i == 0 else out_channels, out_channels, 3, norm="group")
            for i in range(max(steps, 1))
        )
        self.ups = nn.ModuleList(make_upsample(upsample, out_channels, out_channels, 2) for _ in range(steps))

    def forward(self, x: torch.Tensor, size: torch.Size, last_upsample: bool = True) -> torch.Tensor:
        """`last_upsample=False` stops before the final upsampling (at stride 8)."""
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.ups) - (0 if last_upsample else 1):
                # The last step lands exactly on the stride-4 size, the others double.
                x = self.ups[i](x, size=size if i == len(self.ups) - 1 else None)
        return x


class FPN(nn.Module, UpsamplingConvCaller):
    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        pyramid_channels: int = 256,
        head_channels: int = 128,
        upsample: str = "bilinear",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        levels = [i for i, s in enumerate(encoder.strides) if s >= 4][-4:]
        strides = [encoder.strides[i] for i in levels]
        if strides != [4, 8, 16, 32]:
            raise ValueError(f"FPN needs encoder maps at strides 4, 8, 16, 32; this encoder has {encoder.strides}")
        self.encoder = encoder
        self.levels = levels
        self.laterals = nn.ModuleList(nn.Conv2d(encoder.channels[i], pyramid_channels, 1) for i in levels)
        # The top-down pathway upsamples by nearest neighbour, as in FPN; `upsample` is the heads'.
        self.top_down = nn.ModuleList(make_upsample("nearest", pyramid_channels) for _ in levels[1:])
        self.heads = nn.ModuleList(
            LevelHead(pyramid_channels, head_channels, steps, upsample) for steps in range(len(levels))
        )
        # Fixed interpolations are linear and alike in every head: sum before the last one.
        self.sum_at_stride8 = upsample in ("nearest", "bilinear", "bicubic", "bed_of_nails")
        # The stride-4 head's convolution straight from C2 and P3 (module docstring), where that
        # multiplies less: per stride-4 pixel 9 C2 H + 4 P H (the stride-8 transposed
        # convolution's 16 taps over a quarter of the pixels) against C2 P + 9 P H. True for
        # ResNet-18/34's 64-channel C2, not for ResNet-50's 256.
        c2, p, h = encoder.channels[levels[0]], pyramid_channels, head_channels
        self.compose_stride4 = 9 * c2 * h + 4 * p * h < c2 * p + 9 * p * h
        self._stride4_kept: KeptFromWeights[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = KeptFromWeights()
        self._stride4_filters: KeptFromWeights[torch.Tensor] = KeptFromWeights()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = pad_to_multiple(x, 32)
        features = self.encoder(x)
        c2 = features[self.levels[0]]
        stride4 = c2.shape[-2:]
        compose = self.compose_stride4
        laterals = [lateral(features[i]) for lateral, i in zip(self.laterals[1:], self.levels[1:])]
        pyramid = [laterals[-1]]
        for up, lateral in zip(self.top_down, reversed(laterals[:-1])):
            pyramid.insert(0, lateral + up(pyramid[0], size=lateral.shape[-2:]))
        if compose:
            head0 = self._stride4_head(c2, pyramid[0])
        else:
            pyramid.insert(0, self.laterals[0](c2) + self.top_down[-1](pyramid[0], size=stride4))
            head0 = self.heads[0](pyramid.pop(0), stride4)
        if self.sum_at_stride8:
            deeper = sum(head(level, stride4, last_upsample=False) for head, level in zip(self.heads[1:], pyramid))
            merged = head0 + self.heads[-1].ups[-1](deeper, size=stride4)
        else:
            merged = head0 + sum(head(level, stride4) for head, level in zip(self.heads[1:], pyramid))
        logits = self.classifier(self.dropout(merged))
        return crop_to(upsample_scores(logits, x.shape[-2:]), size)

    def _stride4_head(self, c2: torch.Tensor, p3: torch.Tensor) -> torch.Tensor:
        """heads[0](lateral(c2) + nearest_up(p3)) without building P2 (module docstring)."""
        (conv, norm, act), = self.heads[0].convs
        lateral = self.laterals[0]
        composed, transposed, whole = self._stride4_kernels(conv.weight, lateral.weight)
        if lateral.bias is not None:
            p3 = p3 + lateral.bias.view(1, -1, 1, 1)
        # Where the engine asks for it, Winograd on the upsampled grid, C2 as the skip.
        out = self._doubling_winograd(p3, c2, whole, conv.bias, self._stride4_filters, [conv.weight, lateral.weight])
        if out is not None:
            return act(norm(out))
        # Both convolutions through the calls a training route replaces (the head convolution's
        # `_conv_forward`, which has the composed kernel's settings, and `_upsampling_conv`):
        # oneDNN's float32 weight gradients of these two took 1.0 s of a 4.4 s FPN-R34 step.
        out = self._upsampling_conv(p3, transposed, conv.bias)
        return act(norm(out.add_(conv._conv_forward(c2, composed, None))))

    def _stride4_kernels(self, weight: torch.Tensor,
                         lateral_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(3x3 kernel composed with the lateral, transposed kernel for up(P3), the whole 3x3
        kernel over cat([up(P3), C2])); without gradients built once and kept until either
        weight changes (1.9 ms a call otherwise)."""

        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            exact = weight.float() if weight.element_size() < 4 else weight  # sums in float32
            composed = torch.einsum("oikl,ij->ojkl", exact, lateral_weight.flatten(1).to(exact.dtype)).to(weight.dtype)
            return (in_layout_of(composed, weight), in_layout_of(nearest2x_transposed_weight(weight), weight),
                    torch.cat([weight, composed], 1))

        return self._stride4_kept.get_unless_training([weight, lateral_weight], build)  # training: at every call


@register_model("fpn", paper="Kirillov et al., CVPR 2019")
def fpn(*, num_classes: int, in_channels: int = 3, encoder: str = "resnet50", encoder_weights: str | None = None,
        pyramid_channels: int = 256, head_channels: int = 128, upsample: str = "bilinear") -> nn.Module:
    """Semantic FPN: top-down pyramid, per-level 3x3 heads upsampled to stride 4 and summed."""
    backbone = create_encoder(encoder, in_channels=in_channels, weights=encoder_weights)
    return FPN(backbone, num_classes, pyramid_channels, head_channels, upsample)
