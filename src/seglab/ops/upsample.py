"""The upsampling family behind one interface: ``make_upsample(kind, in_channels, out_channels, scale)``.

Every module returned maps N x in_channels x H x W to N x out_channels x (scale*H) x (scale*W),
or exactly to `size` when one is given (decoders pass the skip connection's size, so odd sizes
line up). Max-unpooling also needs the pooling `indices`.

Kinds (the lecture's list, "unpooling" to "learnable upsampling"):
- ``bed_of_nails``: each value goes to the top-left corner of its scale x scale cell, zeros elsewhere.
- ``nearest``, ``bilinear``, ``bicubic``: fixed interpolation (F.interpolate).
- ``transposed``: learnable transposed convolution initialised to bilinear interpolation
  (Long et al., CVPR 2015 "Fully Convolutional Networks"), kernel 2*scale - scale % 2.
- ``resize_conv``: nearest resize then a 3x3 convolution (Odena et al., Distill 2016
  "Deconvolution and Checkerboard Artifacts"), which cannot produce the checkerboard pattern.
- ``max_unpool``: values go back to where the encoder's max-pooling found them
  (Badrinarayanan et al., TPAMI 2017 "SegNet"; Noh et al., ICCV 2015 "DeconvNet").
- ``pixel_shuffle``: a 3x3 conv to out*scale^2 channels rearranged into space
  (Shi et al., CVPR 2016 "Sub-pixel convolution").

Fixed kinds add a 1x1 convolution when the channel count changes.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from seglab.ops import native
from seglab.ops.bilinear import bilinear_upsample_by, whole_scale
from seglab.ops.grad_mode import records_gradients
from seglab.ops.nearest_conv import NearestUpsampleConv
from seglab.ops.polyphase import PolyphaseConvTranspose2d
from seglab.ops.tracing import being_traced

__all__ = ["UPSAMPLE_KINDS", "Upsample", "make_upsample", "bilinear_kernel", "native_score_upsampling",
           "upsample_scores"]

UPSAMPLE_KINDS = (
    "bed_of_nails",
    "nearest",
    "bilinear",
    "bicubic",
    "transposed",
    "resize_conv",
    "max_unpool",
    "pixel_shuffle",
)

Size = tuple[int, int] | torch.Size | None


class Upsample(nn.Module):
    """Base class: `forward(x, size=None, indices=None)`; subclasses implement `_upsample`."""

    def __init__(self, in_channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"upsampling scale must be a positive integer, not {scale}")
        self.in_channels, self.out_channels, self.scale = in_channels, out_channels, scale

    def forward(self, x: torch.Tensor, size: Size = None, indices: torch.Tensor | None = None) -> torch.Tensor:
        if size is None:
            size = (x.shape[-2] * self.scale, x.shape[-1] * self.scale)
        return self._upsample(x, tuple(size), indices)

    def _upsample(self, x: torch.Tensor, size: tuple[int, int], indices: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def _fit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop (or replicate-pad) the bottom/right edge to `size`; a learnt upsampler produces
    exactly scale*H, and the target may be a pixel smaller or larger for odd sizes."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dh == 0 and dw == 0:
        return x
    x = x[..., : size[0], : size[1]]
    if dh > 0 or dw > 0:
        x = F.pad(x, (0, max(dw, 0), 0, max(dh, 0)), mode="replicate")
    return x


def _channel_projection(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)


class BedOfNails(Upsample):
    def __init__(self, in_channels: int, out_channels: int, scale: int) -> None:
        super().__init__(in_channels, out_channels, scale)
        self.project = _channel_projection(in_channels, out_channels)

    def _upsample(self, x, size, indices):
        n, c, h, w = x.shape
        # Placing x on the strided grid of a zero tensor: a sum with zeros, so it stays traceable.
        nails = x.new_zeros(n, c, h, self.scale, w, self.scale)
        nails[:, :, :, 0, :, 0] = x
        return self.project(_fit(nails.reshape(n, c, h * self.scale, w * self.scale), size))


class Interpolate(Upsample):
    def __init__(self, in_channels: int, out_channels: int, scale: int, mode: str) -> None:
        super().__init__(in_channels, out_channels, scale)
        self.mode = mode
        self.project = _channel_projection(in_channels, out_channels)

    def _upsample(self, x, size, indices):
        align = {} if self.mode == "nearest" else {"align_corners": False}
        return self.project(F.interpolate(x, size=size, mode=self.mode, **align))


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
    """Transposed-conv weight (in, out, k, k) performing bilinear interpolation channel by
    channel — FCN's initialisation; channels beyond min(in, out) start at zero."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float32) - center).abs() / factor
    weight = torch.zeros(in_channels, out_channels, kernel_size, kernel_size)
    for channel in range(min(in_channels, out_channels)):
        weight[channel, channel] = taps[:, None] * taps[None, :]
    return weight


class TransposedConv(Upsample):
    def __init__(self, in_channels: int, out_channels: int, scale: int, kernel_size: int | None = None) -> None:
        super().__init__(in_channels, out_channels, scale)
        kernel_size = kernel_size or 2 * scale - scale % 2
        # padding/output_padding chosen so that the output is exactly scale * input. At an even
        # scale of 8 or more (kernel 2 * scale) CPU training computes it as one convolution at
        # the input's size (seglab.ops.polyphase).
        padding = max(0, (kernel_size - scale + 1) // 2)
        output_padding = scale - kernel_size + 2 * padding
        self.conv = PolyphaseConvTranspose2d(
            in_channels, out_channels, kernel_size, stride=scale, padding=padding, output_padding=output_padding, bias=False
        )
        with torch.no_grad():
            self.conv.weight.copy_(bilinear_kernel(in_channels, out_channels, kernel_size))
        # Set by a model that holds this layer at the bilinear kernel (FCN's final upsampling) and
        # freezes it. The fast path and EMA copies freeze every weight, a learnt layer's too,
        # which must stay a transposed convolution even while its weight is still the kernel.
        self.fixed = False
        self._bilinear_key: tuple | None = None  # the weight version whose check `_bilinear` holds
        self._bilinear = False

    def is_fixed_bilinear(self) -> bool:
        """Whether this layer is bilinear interpolation held fixed: `fixed`, its weight frozen and
        still the bilinear kernel (in the weight's dtype: the bf16 fast path casts it), as FCN's
        final layer (Long et al., Sec. 4.3). A learnt filter, or a loaded one that differs, is
        not. The comparison runs once per version of the weight.

        Under torch.export (the ONNX exporter) the weight holds no values to compare: the last
        eager answer stands, so an exporter runs the model eagerly first (`seglab.export`);
        without one, the transposed convolution the weight defines."""
        weight = self.conv.weight
        if not self.fixed or weight.requires_grad or self.conv.kernel_size[0] != 2 * self.scale or self.scale % 2:
            return False
        if torch.compiler.is_exporting():
            return self._bilinear_key is not None and self._bilinear
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if key != self._bilinear_key:
            expected = bilinear_kernel(self.in_channels, self.out_channels, self.conv.kernel_size[0])
            self._bilinear = torch.equal(weight.detach().cpu(), expected.to(weight.dtype))
            self._bilinear_key = key
        return self._bilinear

    def _upsample(self, x, size, indices):
        if self.is_fixed_bilinear():
            # Away from the borders the transposed convolution (kernel 2s, stride s, padding s/2)
            # computes exactly bilinear interpolation, channel by channel; computed as such it
            # is a fraction of the work (FCN-8s' x8, 4 x 21 x 64 x 64 scores, bf16 training:
            # 55 ms forward and input gradient as oneDNN's convolution, about 12 as
            # interpolation). In the s/2 rows and columns along each border interpolation
            # holds the edge value where the convolution fades towards zero padding.
            return _fit(upsample_scores(x, (x.shape[-2] * self.scale, x.shape[-1] * self.scale)), size)
        return _fit(self.conv(x), size)


class ResizeConv(Upsample):
    def __init__(self, in_channels: int, out_channels: int, scale: int) -> None:
        super().__init__(in_channels, out_channels, scale)
        # At scale 2 the convolution reads x at its own resolution (same function, fewer FLOPs).
        self.conv = NearestUpsampleConv(in_channels, out_channels, 3, padding=1)

    def _upsample(self, x, size, indices):
        return self.conv(x, size=size)


class MaxUnpool(Upsample):
    def __init__(self, in_channels: int, out_channels: int, scale: int) -> None:
        super().__init__(in_channels, out_channels, scale)
        self.project = _channel_projection(in_channels, out_channels)

    def _upsample(self, x, size, indices):
        if indices is None:
            raise ValueError("max_unpool upsampling needs the indices of the matching max-pooling")
        # max_pool2d's indices are flat positions in the pre-pooling plane: scatter the values
        # back there. Same result as F.max_unpool2d, whose size checks cannot be traced for export.
        n, c = x.shape[:2]
        plane = x.new_zeros(n, c, size[0] * size[1]).scatter(2, indices.flatten(2), x.flatten(2))
        return self.project(plane.view(n, c, size[0], size[1]))


class PixelShuffle(Upsample):
    def __init__(self, in_channels: int, out_channels: int, scale: int) -> None:
        super().__init__(in_channels, out_channels, scale)
        self.conv = nn.Conv2d(in_channels, out_channels * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def _upsample(self, x, size, indices):
        return _fit(self.shuffle(self.conv(x)), size)


def make_upsample(kind: str, in_channels: int, out_channels: int | None = None, scale: int = 2, **options) -> Upsample:
    """Build an upsampler of `kind` (one of UPSAMPLE_KINDS); `options` go to the transposed
    convolution (`kernel_size`, e.g. 3 to reproduce checkerboard artifacts with stride 2)."""
    out_channels = out_channels or in_channels
    if options and kind != "transposed":
        raise ValueError(f"upsample kind {kind!r} takes no options, got {sorted(options)}")
    if kind in ("nearest", "bilinear", "bicubic"):
        return Interpolate(in_channels, out_channels, scale, kind)
    builders = {
        "bed_of_nails": BedOfNails,
        "transposed": TransposedConv,
        "resize_conv": ResizeConv,
        "max_unpool": MaxUnpool,
        "pixel_shuffle": PixelShuffle,
    }
    if kind not in builders:
        raise ValueError(f"unknown upsample kind {kind!r}; choose one of {', '.join(UPSAMPLE_KINDS)}")
    return builders[kind](in_channels, out_channels, scale, **options)


class _NativeScoreUpsampling(torch.autograd.Function):
    """`native.resize_bilinear` forward and its gradient by `native.resize_bilinear_backward`,
    for channels-last float32 class scores in CPU training."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        ctx.source_size = tuple(scores.shape[-2:])
        return native.resize_bilinear(scores.permute(0, 2, 3, 1), size).permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # The native cross-entropy's gradient comes channels-last already; a sum with another
        # loss's gradient may not.
        nhwc = grad.float().permute(0, 2, 3, 1).contiguous()
        return native.resize_bilinear_backward(nhwc, ctx.source_size).permute(0, 3, 1, 2), None


_native_training_route = True


@contextmanager
def native_score_upsampling(enabled: bool) -> Iterator[None]:
    """Within the block `upsample_scores` takes (`enabled`) or leaves (not) the native route in
    CPU training; the bench's ablation measures it so. On by default."""
    global _native_training_route
    before, _native_training_route = _native_training_route, bool(enabled)
    try:
        yield
    finally:
        _native_training_route = before


def upsample_scores(scores: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear upsampling of a model's class scores to `size`, in float32 whatever the model's
    dtype. Scores have few channels, so the cast is cheap before the upsampling; the full-size
    map is rounded once less; and on the CPU the float32 kernel is the faster one (21 channels
    in channels-last bf16, 128 -> 512: 8.1 ms plus 0.5 ms to cast the result, against 5.0 ms
    in float32; 2 threads, Zen 4). In CPU inference mode on a channels-last map, the native
    kernel (`seglab.ops.native.resize_bilinear`) computes the same values writing the result
    once, and without it `bilinear_upsample_by` (a map enlarged by a whole factor) in about
    half PyTorch's time. 21 channels to 512 x 512, 2 threads, Xeon with AVX-512, interleaved:
    two-pass / native 3.7 / 1.9 ms from 128 x 128 at batch 1, 31.0 / 14.4 ms at batch 8;
    2.4 / 1.4 and 21.9 / 13.5 ms from 64 x 64 (F.interpolate: 8.1, 33.8, 8.2, 33.6 ms).

    In CPU training (gradients recorded, no tracer) the same kernel runs forward, and its
    gradient is one pass of `native.resize_bilinear_backward` over the full-size gradient:
    4 x 21 scores, 128 x 128 -> 512 x 512, 2 threads of a Zen 4, interleaved: forward 5.9
    against F.interpolate's 8.0 ms, backward 7.9-8.3 against 18.0-18.8 ms (from 64 x 64: 5.4
    against 11.2, 6.7-6.9 against 13.9-17.7). The same sums in float32, added in another order."""
    scores = scores.float()
    # Plain no_grad evaluation and FLOP counting see F.interpolate, which FlopCounterMode does
    # not count, like the peers' models.
    if (scores.device.type == "cpu" and scores.dim() == 4
            and scores.is_contiguous(memory_format=torch.channels_last)):
        if torch.is_inference_mode_enabled():
            if native.available():
                return native.resize_bilinear(scores.permute(0, 2, 3, 1), size).permute(0, 3, 1, 2)
            scale = whole_scale(scores, size)
            if scale is not None:
                return bilinear_upsample_by(scores, scale)
        elif (_native_training_route and records_gradients(scores) and min(scores.shape[-2:]) >= 1
              and not being_traced() and native.available()):
            return _NativeScoreUpsampling.apply(scores, (int(size[0]), int(size[1])))
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
