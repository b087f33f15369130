"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015, "U-Net: Convolutional Networks for
Biomedical Image Segmentation").

The figure: a contracting path of repeated (3x3 conv, ReLU) x2 + 2x2 max-pool, doubling the
channels at each step (64 -> 1024); an expanding path of 2x2 up-convolutions halving the
channels, concatenation with the cropped feature map of the same level, (3x3 conv, ReLU) x2;
a final 1x1 convolution to the classes.

`padding="same"` (default) keeps sizes with padded 3x3 convs, the common modern variant.
`padding="valid"` is the paper's unpadded network; its output is smaller than its input, so
the input is mirrored at the border (the paper's overlap-tile strategy) to predict every pixel.

`encoder="resnet34"` (any name `seglab.encoders.create_encoder` knows) builds instead the
U-Net-like decoder on that encoder: from the deepest map up, upsample to the next skip's size,
concatenate it, two 3x3 conv blocks; blocks without skip carry on to full resolution.

`task="image2image"` makes the head a regression head: `num_classes` output channels of
unbounded values to be trained with an L1 or L2 loss (colorisation, inpainting, denoising).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.encoders import create_encoder
from seglab.models.registry import register_model
from seglab.ops.conv import ConvNormAct
from seglab.ops.nearest_conv import NearestUpsampleConv
from seglab.ops.padding import crop_to, pad_to_multiple
from seglab.ops.tracing import being_traced
from seglab.ops.upsample import make_upsample


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) twice: one box of the figure. `first_conv`: the class of the
    first convolution."""

    def __init__(
        self, in_channels: int, out_channels: int, padding: int, norm: str | None, first_conv: type[nn.Conv2d] = nn.Conv2d
    ) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, 3, padding=padding, norm=norm, conv=first_conv),
            ConvNormAct(out_channels, out_channels, 3, padding=padding, norm=norm),
        )


class UpBlock(nn.Module):
    """2x2 up-convolution halving the channels, concatenation with the skip, DoubleConv.
    `upsample` names another upsampler of `seglab.ops.upsample` to use instead."""

    def __init__(
        self, in_channels: int, out_channels: int, padding: int, norm: str | None, upsample: str | None = None
    ) -> None:
        super().__init__()
        if upsample is None:
            self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        else:
            self.up = make_upsample(upsample, in_channels, out_channels, 2)
        self.conv = DoubleConv(2 * out_channels, out_channels, padding, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip = _center_crop(skip, x.shape[-2:])
        return self.conv(torch.cat([skip, x], dim=1))


def _center_crop(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    top = (x.shape[-2] - size[0]) // 2
    left = (x.shape[-1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


class UNet(nn.Module):
    """The original U-Net: `depth` resolution levels, `base_channels` at the top level."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        base_channels: int = 64,
        depth: int = 5,
        padding: str = "same",
        norm: str | None = "batch",
        upsample: str | None = None,
    ) -> None:
        super().__init__()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', not {padding!r}")
        if depth < 2:
            raise ValueError("depth must be at least 2")
        self.depth = depth
        self.valid = padding == "valid"
        pad = 0 if self.valid else 1
        widths = [base_channels * 2**i for i in range(depth)]
        self.encoder = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoder.append(DoubleConv(previous, width, pad, norm))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.decoder = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], pad, norm, upsample) for i in reversed(range(depth - 1))
        )
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x, offset = self._pad_input(x)
        skips = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in self.decoder:
            x = block(x, skips.pop())
        logits = self.head(x)
        return logits[..., offset[0] : offset[0] + height, offset[1] : offset[1] + width]

    def _pad_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pad so every pooling sees an even size; in the valid variant also mirror the border
        (overlap-tile) so that the output covers the whole input. Returns the padded input and
        where the original image starts in the output."""
        pads, offsets = [], []
        for size in x.shape[-2:]:
            if self.valid:
                needed, margin = valid_input_size(size, self.depth)
                before = margin + (needed - 2 * margin - size) // 2
                pads.append((before, needed - size - before))
                offsets.append(before - margin)
            else:  # the same sums as modular arithmetic, which tracers keep symbolic
                extra = (-size) % 2 ** (self.depth - 1)
                pads.append((extra // 2, extra - extra // 2))
                offsets.append(extra // 2)
        (top, bottom), (left, right) = pads
        # Reflection needs a pad narrower than the image. A tracer reflects without asking in the
        # same variant, whose pads are at most 2^(depth-2) pixels: a branch on the size would be
        # frozen into its graph.
        traced_same = being_traced() and not self.valid
        reflects = traced_same or (max(top, bottom) < x.shape[-2] and max(left, right) < x.shape[-1])
        return F.pad(x, (left, right, top, bottom), mode="reflect" if reflects else "replicate"), (offsets[0], offsets[1])


def valid_input_size(output_size: int, depth: int) -> tuple[int, int]:
    """Smallest input of the unpadded U-Net whose output is at least `output_size`.

    Returns (input size, margin), where margin is how many input pixels each side of the
    output are lost to the valid convolutions (the output starts at input pixel `margin`).
    """
    candidate = output_size
    while True:
        out = _valid_output_size(candidate, depth)
        if out is not None and out >= output_size:
            return candidate, (candidate - out) // 2
        candidate += 1


def _valid_output_size(size: int, depth: int) -> int | None:
    for _ in range(depth - 1):
        size -= 4
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= 4
    if size <= 0:
        return None
    for _ in range(depth - 1):
        size = 2 * size - 4
    return size


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate the skip (if any), two 3x3 conv blocks.

    With nearest upsampling the first convolution reads x at its own resolution
    (`seglab.ops.nearest_conv`: the same function and parameters, 2.25x fewer multiply-adds
    for x's share, no upsampled map).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, upsample: str, norm: str | None) -> None:
        super().__init__()
        nearest = upsample == "nearest"
        # Nearest upsampling happens inside the first convolution; other kinds are a module.
        self.up = None if nearest else make_upsample(upsample, in_channels, in_channels, 2)
        first_conv = NearestUpsampleConv if nearest else nn.Conv2d
        self.conv = DoubleConv(in_channels + skip_channels, out_channels, 1, norm, first_conv)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        if self.up is None:
            (conv, norm, act), second = self.conv
            return second(act(norm(conv(x, skip))))
        if skip is None:
            return self.conv(self.up(x))
        return self.conv(torch.cat([self.up(x, size=skip.shape[-2:]), skip], dim=1))


class EncoderUNet(nn.Module):
    """The U-Net decoder on any encoder of the `seglab.encoders` contract."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        decoder_channels: list[int] | tuple[int, ...] = (256, 128, 64, 32, 16),
        upsample: str = "nearest",
        norm: str | None = "batch",
    ) -> None:
        super().__init__()
        if upsample == "max_unpool":
            raise ValueError("the encoder U-Net has no pooling indices; choose another upsample than 'max_unpool'")
        self.encoder = encoder
        skips = list(reversed(encoder.channels[:-1]))
        # Blocks without skip bring the shallowest map (stride strides[0]) to full resolution.
        extra = max(0, encoder.strides[0].bit_length() - 1)
        needed = len(skips) + extra
        if len(decoder_channels) != needed:
            raise ValueError(
                f"decoder_channels needs {needed} entries for this encoder (strides {encoder.strides}: one block "
                f"per skip map, {len(skips)}, and one per doubling from stride {encoder.strides[0]} to the image, "
                f"{extra}), got {list(decoder_channels)}"
            )
        self.multiple = max(encoder.strides)
        previous = encoder.channels[-1]
        self.blocks = nn.ModuleList()
        for i, out in enumerate(decoder_channels):
            skip = skips[i] if i < len(skips) else 0
            self.blocks.append(DecoderBlock(previous, skip, out, upsample, norm))
            previous = out
        self.head = nn.Conv2d(previous, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = pad_to_multiple(x, self.multiple)
        features = self.encoder(x)
        skips = list(reversed(features[:-1]))
        y = features[-1]
        for i, block in enumerate(self.blocks):
            y = block(y, skips[i] if i < len(skips) else None)
        return crop_to(self.head(y), size)


@register_model("unet", paper="Ronneberger et al., MICCAI 2015")
def unet(
    *,
    num_classes: int,
    in_channels: int = 3,
    base_channels: int = 64,
    depth: int = 5,
    padding: str = "same",
    norm: str | None = "batch",
    encoder: str | None = None,
    encoder_weights: str | None = None,
    decoder_channels: list[int] | None = None,
    upsample: str | None = None,
    task: str = "semantic",
) -> nn.Module:
    """U-Net: contracting/expanding paths with skip concatenation (64..1024 channels by default).

    With `encoder`, the U-Net-like decoder on that encoder (`depth` stages of it,
    `decoder_channels` widths, default 256..16). `upsample` picks the decoder's upsampler
    (default: the paper's 2x2 up-convolution, nearest for the encoder variant).
    `task="image2image"` returns `num_classes` regression channels instead of class logits.
    """
    if task not in ("semantic", "image2image"):
        raise ValueError(f"task must be 'semantic' or 'image2image', not {task!r}")
    if encoder is None:
        if encoder_weights is not None or decoder_channels is not None:
            raise ValueError("encoder_weights and decoder_channels apply only with an encoder=")
        model: nn.Module = UNet(num_classes, in_channels, base_channels, depth, padding, norm, upsample)
    else:
        if padding != "same":
            raise ValueError("the encoder U-Net supports only padding='same'")
        backbone = create_encoder(encoder, in_channels=in_channels, weights=encoder_weights, depth=depth)
        channels = decoder_channels
        if channels is None:
            extra = max(0, backbone.strides[0].bit_length() - 1)
            channels = [256, 128, 64, 32, 16][-(len(backbone.channels) - 1 + extra):]
        model = EncoderUNet(backbone, num_classes, channels, upsample or "nearest", norm)
    model.task = task
    return model
