"""A 3x3 convolution of a nearest-upsampled (x2) map, computed at the low resolution.

U-Net-like decoders upsample by 2 with nearest interpolation, concatenate the skip, and run a
3x3 convolution (padding 1) over the result. Nearest upsampling repeats each pixel in a 2x2
block, so each output row of that convolution reads only two low-resolution rows, and the
kernel taps that land on the same source row add up:

    output row 2i   reads low rows i-1 (tap 0) and i (taps 1 + 2)
    output row 2i+1 reads low rows i (taps 0 + 1) and i+1 (tap 2)

(columns alike). That is a transposed convolution with stride 2, padding 1 and a 4-tap kernel
per axis: low row i reaches output rows 2i-1, 2i, 2i+1, 2i+2 through the taps
[2, 1 + 2, 0 + 1, 0] of the 3x3 kernel. One 4x4 transposed convolution at the low resolution
replaces the 3x3 convolution at the high resolution: 16 taps per low-resolution pixel instead
of 36, i.e. 2.25x fewer multiply-adds for the upsampled part, and the upsampled map is never
built; oneDNN writes the four interleaved output phases directly. Zero padding agrees: the
high-resolution padding row -1 comes from low-resolution row -1, also padding. The skip's
share stays an ordinary 3x3 convolution at the high resolution, the two are summed. Equal to
the plain computation up to summation order.

Where channels are many, `seglab.ops.winograd_nearest` does fewer multiply-adds still, by
Winograd on the upsampled grid (x's tiles gathered from x itself), the skip included.

(An earlier form ran the four phases as one 2x2 convolution to 4 x C_out channels and
interleaved them with strided copies; on a 2-core Xeon with AMX, bf16, the interleave made it
slower than upsampling outright, while the transposed convolution was 1.1-2.5x faster than
both in every U-Net-R34 decoder shape, in inference and in training.)
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.ops.grad_mode import records_gradients
from seglab.ops.kept import KeptFromWeights
from seglab.ops.layout import in_layout_of
from seglab.ops.winograd import winograd_filters
from seglab.ops.winograd_nearest import winograd_conv3x3_of_nearest2x


def _nearest2x_taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """A 3-tap kernel axis as the 4 taps of the stride-2 transposed convolution."""
    first, middle, last = weight.unbind(dim)
    return torch.stack([last, middle + last, first + middle, first], dim)


def nearest2x_transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """C_out x C x 3 x 3 convolution kernel -> C x C_out x 4 x 4 kernel of the transposed
    convolution (stride 2, padding 1) that computes it over the nearest-upsampled input. Sums
    of up to four taps, in float32 for bf16 / fp16 weights; the result has `weight`'s dtype."""
    exact = weight.float() if weight.element_size() < 4 else weight
    return _nearest2x_taps(_nearest2x_taps(exact, 2), 3).transpose(0, 1).to(weight.dtype)


def conv3x3_of_nearest2x(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                         transposed_weight: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1), computed
    without the upsampled map; `transposed_weight` is `nearest2x_transposed_weight(weight)` when
    the caller keeps it. A channels_last x gives a channels_last result, NCHW gives NCHW."""
    if transposed_weight is None:
        transposed_weight = nearest2x_transposed_weight(weight)
    return UpsamplingConvCaller._upsampling_conv(x, transposed_weight, bias)


class UpsamplingConvCaller:
    """A module that computes the 3x3 convolution of a nearest-upsampled map (and a skip) by
    calling its `_upsampling_conv` (the stride-2 transposed convolution of
    `conv3x3_of_nearest2x`), so that a training route may replace that call per instance, as
    it replaces a Conv2d's `_conv_forward`; or, where its `winograd_tile` gives a tile for the
    call, by Winograd on the upsampled grid (`_doubling_winograd`).

    `winograd_tile`, set per instance by seglab's engine (the fast inference path, the training
    route), takes a call's x and the whole convolution's weight (x's channels first, then the
    skip's) and returns the Winograd tile, or None for the transposed convolution."""

    winograd_tile: Callable[[torch.Tensor, torch.Tensor], int | None] | None = None

    @staticmethod
    def _upsampling_conv(x: torch.Tensor, transposed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv_transpose2d(x, transposed_weight, bias, stride=2, padding=1)

    def _doubling_winograd(self, x: torch.Tensor, skip: torch.Tensor | None, weight: torch.Tensor,
                           bias: torch.Tensor | None, kept: KeptFromWeights[torch.Tensor],
                           parameters: list[torch.Tensor]) -> torch.Tensor | None:
        """conv2d(cat([nearest_up(x), skip]), weight, bias, padding=1) by
        `winograd_conv3x3_of_nearest2x` where `winograd_tile` gives a tile for this call, else
        None. The filters come from `weight` at every call in training, and are otherwise kept
        in `kept` until `parameters` (those `weight` is built from) change."""
        tile = self.winograd_tile(x, weight) if self.winograd_tile is not None else None
        if tile is None:
            return None
        filters = kept.get_unless_training(parameters, lambda: winograd_filters(weight, tile), tile)
        return winograd_conv3x3_of_nearest2x(x, skip, filters, bias)


class NearestUpsampleConv(nn.Conv2d, UpsamplingConvCaller):
    """The 3x3 convolution (stride 1, padding 1) of a U-Net decoder step over
    cat([nearest_upsample(x), skip]), with x read at its own resolution when the step doubles
    its size (`conv3x3_of_nearest2x`); otherwise upsampled to the skip's (or the given) size.

    An nn.Conv2d with the same parameters as the plain convolution (state dicts interchange);
    its input channels are x's plus the skip's, x's first. Call it as `conv(x, skip)` or
    `conv(x, size=...)`; plain `conv(x)` upsamples x by 2. Without gradients (inference) the
    transposed kernel and the skip's share of the kernel are built once and kept until the
    weight changes. Where the engine set its `winograd_tile`, the whole convolution, skip
    included, may go by Winograd on the upsampled grid instead (`UpsamplingConvCaller`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True) -> None:
        if (kernel_size, stride, padding, dilation, groups) not in ((3, 1, 1, 1, 1), ((3, 3), 1, 1, 1, 1)):
            raise ValueError("NearestUpsampleConv is a 3x3 convolution with stride 1, padding 1, dilation 1, one group")
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)
        self._kept: KeptFromWeights[tuple[torch.Tensor, torch.Tensor]] = KeptFromWeights()
        self._kept_filters: KeptFromWeights[torch.Tensor] = KeptFromWeights()

    def _split_weights(self, low_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(transposed kernel for x's channels, 3x3 kernel for the skip's channels)."""
        weight = self.weight
        if torch.is_grad_enabled() and weight.requires_grad:  # training: rebuilt from the parameter at every call
            return nearest2x_transposed_weight(weight[:, :low_channels]), weight[:, low_channels:]

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            return (in_layout_of(nearest2x_transposed_weight(weight[:, :low_channels]), weight),
                    in_layout_of(weight[:, low_channels:], weight))

        return self._kept.get([weight], build, low_channels)

    # The convolution in 8-bit products, set by seglab.engine.int8 for CPU inference: called
    # with (x, skip, size), it returns the output.
    int8: Callable[[torch.Tensor, torch.Tensor | None, tuple[int, int]], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | torch.Size | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        if skip is not None:
            size = skip.shape[-2:]
        elif size is None:
            size = (2 * height, 2 * width)
        if (self.int8 is not None and x.dtype == torch.float32 and x.device.type == "cpu"
                and not records_gradients(self.weight)):
            return self.int8(x, skip, tuple(size))
        if tuple(size) != (2 * height, 2 * width):
            up = F.interpolate(x, size=size, mode="nearest")
            return self._conv_forward(up if skip is None else torch.cat([up, skip], 1), self.weight, self.bias)
        out = self._doubling_winograd(x, skip, self.weight, self.bias, self._kept_filters, [self.weight])
        if out is not None:
            return out
        transposed_weight, skip_weight = self._split_weights(x.shape[1])
        out = self._upsampling_conv(x, transposed_weight, self.bias)
        if skip is not None:
            # In place: the transposed convolution's backward does not need its output. The skip's
            # share has this module's settings (3x3, padding 1).
            out = out.add_(self._conv_forward(skip, skip_weight, None))
        return out
