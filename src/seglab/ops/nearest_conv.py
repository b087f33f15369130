"""A 3x3 convolution of a nearest-upsampled (x2) map, computed at the low resolution.

U-Net-like decoders upsample by 2 with nearest interpolation, concatenate the skip, and run a
3x3 convolution (padding 1) over the result. Nearest upsampling repeats each pixel in a 2x2
block, so each of the four output phases (even / odd row, even / odd column) of that
convolution reads only a 2x2 window of the low-resolution map, and the kernel taps that land
on the same source pixel add up:

    output row 2i   reads low rows i-1 (tap 0) and i (taps 1 + 2)
    output row 2i+1 reads low rows i (taps 0 + 1) and i+1 (tap 2)

(columns alike). One 2x2 convolution at the low resolution with the four phases' kernels as
4 x C_out output channels replaces the 3x3 convolution at the high resolution: 16 taps per
low-resolution pixel instead of 36, i.e. 2.25x fewer multiply-adds for the upsampled part, and
the upsampled map is never built. Zero padding agrees: the high-resolution padding row -1 comes
from low-resolution row -1, also padding. The skip's share stays an ordinary 3x3 convolution at
the high resolution, the two are summed. Equal to the plain computation up to summation order.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _phase_taps(weight: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-tap kernel axis folded into the 2 taps the even and the odd output phase read."""
    first, middle, last = weight.unbind(dim)
    even = torch.stack([first, middle + last], dim)
    odd = torch.stack([first + middle, last], dim)
    return even, odd


def nearest2x_phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """C_out x C x 3 x 3 kernel -> (4 C_out) x C x 2 x 2: the kernels of output phases
    (row parity, column parity) = (0, 0), (0, 1), (1, 0), (1, 1), in that order."""
    phases = []
    for rows in _phase_taps(weight, 2):
        phases.extend(_phase_taps(rows, 3))
    return torch.cat(phases, 0)


def conv3x3_of_nearest2x(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1), computed
    without the upsampled map. A channels_last x gives a channels_last result, NCHW gives NCHW."""
    out_channels = weight.shape[0]
    # Sums of up to four taps: in float32 when the weights are bf16 / fp16.
    phase_weight = nearest2x_phase_weight(weight.float() if weight.element_size() < 4 else weight).to(weight.dtype)
    phase_bias = None if bias is None else bias.repeat(4)  # every phase adds the same bias
    taps = F.conv2d(x, phase_weight, phase_bias, padding=1)  # N x (2 2 C_out) x (H+1) x (W+1): p reads rows p-1, p
    n, _, height, width = x.shape
    taps = taps.unflatten(1, (2, 2, out_channels))
    # Phase (a, b) of low-resolution pixel (i, j) is taps[:, a, b, :, i + a, j + b]. Interleave
    # them as N x H x 2 x W x 2 x C: channels last in memory, the layout oneDNN reads next.
    rows = [
        torch.stack([taps[:, a, b, :, a : a + height, b : b + width].permute(0, 2, 3, 1) for b in (0, 1)], 3)
        for a in (0, 1)
    ]
    out = torch.stack(rows, 2).reshape(n, 2 * height, 2 * width, out_channels).permute(0, 3, 1, 2)
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


class NearestUpsampleConv(nn.Conv2d):
    """The 3x3 convolution (stride 1, padding 1) of a U-Net decoder step over
    cat([nearest_upsample(x), skip]), with x read at its own resolution when the step doubles
    its size (`conv3x3_of_nearest2x`); otherwise upsampled to the skip's (or the given) size.

    An nn.Conv2d with the same parameters as the plain convolution (state dicts interchange);
    its input channels are x's plus the skip's, x's first. Call it as `conv(x, skip)` or
    `conv(x, size=...)`; plain `conv(x)` upsamples x by 2.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True) -> None:
        if (kernel_size, stride, padding, dilation, groups) not in ((3, 1, 1, 1, 1), ((3, 3), 1, 1, 1, 1)):
            raise ValueError("NearestUpsampleConv is a 3x3 convolution with stride 1, padding 1, dilation 1, one group")
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | torch.Size | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        if skip is not None:
            size = skip.shape[-2:]
        elif size is None:
            size = (2 * height, 2 * width)
        if tuple(size) != (2 * height, 2 * width):
            up = F.interpolate(x, size=size, mode="nearest")
            return self._conv_forward(up if skip is None else torch.cat([up, skip], 1), self.weight, self.bias)
        low_channels = x.shape[1]
        out = conv3x3_of_nearest2x(x, self.weight[:, :low_channels], self.bias)
        if skip is not None:
            out = out + F.conv2d(skip, self.weight[:, low_channels:], padding=1)
        return out
