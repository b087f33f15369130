"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015, "U-Net: Convolutional Networks for
Biomedical Image Segmentation").

The figure: a contracting path of repeated (3x3 conv, ReLU) x2 + 2x2 max-pool, doubling the
channels at each step (64 -> 1024); an expanding path of 2x2 up-convolutions halving the
channels, concatenation with the cropped feature map of the same level, (3x3 conv, ReLU) x2;
a final 1x1 convolution to the classes.

`padding="same"` (default) keeps sizes with padded 3x3 convs, the common modern variant.
`padding="valid"` is the paper's unpadded network; its output is smaller than its input, so
the input is mirrored at the border (the paper's overlap-tile strategy) to predict every pixel.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.models.registry import register_model
from seglab.ops.conv import ConvNormAct


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) twice: one box of the figure."""

    def __init__(self, in_channels: int, out_channels: int, padding: int, norm: str | None) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, 3, padding=padding, norm=norm),
            ConvNormAct(out_channels, out_channels, 3, padding=padding, norm=norm),
        )


class UpBlock(nn.Module):
    """2x2 up-convolution halving the channels, concatenation with the skip, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, padding: int, norm: str | None) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
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
            UpBlock(widths[i + 1], widths[i], pad, norm) for i in reversed(range(depth - 1))
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
            else:
                multiple = 2 ** (self.depth - 1)
                needed, margin = -(-size // multiple) * multiple, 0
            before = margin + (needed - 2 * margin - size) // 2 if self.valid else (needed - size) // 2
            pads.append((before, needed - size - before))
            offsets.append(before - margin)
        (top, bottom), (left, right) = pads
        mode = "reflect" if max(top, bottom) < x.shape[-2] and max(left, right) < x.shape[-1] else "replicate"
        return F.pad(x, (left, right, top, bottom), mode=mode), (offsets[0], offsets[1])


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


@register_model("unet", paper="Ronneberger et al., MICCAI 2015")
def unet(
    *,
    num_classes: int,
    in_channels: int = 3,
    base_channels: int = 64,
    depth: int = 5,
    padding: str = "same",
    norm: str | None = "batch",
) -> nn.Module:
    """U-Net: contracting/expanding paths with skip concatenation (64..1024 channels by default)."""
    return UNet(num_classes, in_channels, base_channels, depth, padding, norm)
