"""The training route of a model's convolutions on the CPU.

In float32 these rewrites, each exact up to float32 rounding, chosen per call:

- Winograd's F(4x4, 3x3) or F(6x6, 3x3) (`seglab.ops.winograd`) for the 3x3 convolutions
  where it pays (`seglab.engine.winograd`): a quarter to a fifth of the multiply-adds, forward
  and backward.
- A U-Net decoder's convolution over its upsampled input and skip (and an FPN's stride-4
  head, over up(P3) and C2), on the upsampled grid by Winograd (`seglab.ops.winograd_nearest`)
  where `upsampling_output_tile` says it pays.
- A large-dilation `AtrousConv2d` (DeepLab's ASPP) by Winograd over the map's phases where
  that does fewer multiply-adds than its per-tap windows (`atrous_output_tile`).
- Elsewhere oneDNN's forward and input gradient, with the weight gradient by the kernel timed
  fastest for the shape (`seglab.ops.weight_gradient`): oneDNN's own float32 weight gradient on
  channels-last maps is the slowest part of a training step on processors without bf16.

One more, not exact (`int8_products`, CPUs with VNNI or AMX): the large 1x1 convolutions'
forward and input gradient as int8 products with one scale per row (`seglab.ops.int8_products`;
about 0.5-1% of each product's size), their weight gradients in float32, and likewise a
large-dilation `AtrousConv2d` (DeepLab's ASPP) by its per-tap windows with int8 products, its
weight gradient by Winograd over the map's phases where `atrous_output_tile` gives a tile,
else by the float32 windows. The trainer takes it
by default where `--precision auto` trains in float32 on such a CPU, as it takes bf16 where
that is native: a trained DeepLabV3-R50's step gradient moved 1.0-1.2% from float64's, bf16
autocast's 4.1-4.9% (docs/bench.md).

`TrainingConvolutions(model)` is a context: inside it the model's convolution modules route
their calls (the module's `_conv_forward`, and the `_upsampling_conv` of a U-Net decoder's or
an FPN's nearest-upsampling convolutions, are replaced per instance and restored on exit), so
the rest of the model runs as it is, with no per-operator dispatch. Under bf16 autocast the
wider 3x3 convolutions take F(2x2, 3x3) with bf16 products (`seglab.engine.winograd`'s
`bf16_pays`), the others autocast's direct ones. Other dtypes, other devices and calls
without gradients keep the plain convolution; so does `--direct-convolutions` (no context at
all).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, ContextManager

import torch
import torch.nn as nn

from seglab.engine.precision import resolve_precision
from seglab.engine.winograd import (
    atrous_call_tile,
    call_output_tile,
    conv_takes_winograd,
    min_channels,
    upsampling_output_tile,
)
from seglab.ops.atrous_depthwise import trains
from seglab.ops.atrous_gemm import AtrousConv2d
from seglab.ops.grad_mode import records_gradients
from seglab.ops.int8_products import int8_pointwise_conv, takes_int8_pointwise
from seglab.ops.nearest_conv import UpsamplingConvCaller
from seglab.ops.weight_gradient import ConvSettings, takes_tuned_weight_gradient, tuned_convolution
from seglab.ops.winograd import winograd_conv3x3, winograd_filters

__all__ = ["TrainingConvolutions", "training_convolutions"]

_UPSAMPLING = ConvSettings(stride=(2, 2), padding=(1, 1), dilation=(1, 1), transposed=True)


def _routable(module: nn.Module) -> bool:
    """A Conv2d computed by the base class's `_conv_forward` with numeric zero padding."""
    return (isinstance(module, nn.Conv2d) and type(module)._conv_forward is nn.Conv2d._conv_forward
            and module.padding_mode == "zeros" and isinstance(module.padding, tuple))


class TrainingConvolutions:
    """A context in which `model`'s convolutions take the training route above: `winograd` for
    the 3x3 convolutions where it pays, `tuned_weight_gradients` for the rest: their kernels
    timed at the first step, or, `deterministic`, fixed without timing (the same bits in every
    run from the same seed); with `int8_products`, the large 1x1 convolutions and atrous windows
    by int8 products."""

    def __init__(self, model: nn.Module, *, winograd: bool = True, tuned_weight_gradients: bool = True,
                 deterministic: bool = False, int8_products: bool = False) -> None:
        self.tuned_weight_gradients = tuned_weight_gradients
        self.int8_products = int8_products
        self.timed = not deterministic
        self.convs = [m for m in model.modules() if _routable(m)]
        self.winograd_convs = {id(m) for m in self.convs if winograd and conv_takes_winograd(m, min_channels(training=True))}
        callers = [m for m in model.modules() if isinstance(m, UpsamplingConvCaller)]
        self.upsampling_convs = callers if tuned_weight_gradients else []  # their `_upsampling_conv`
        self.doubling_convs = callers if winograd else []  # their `winograd_tile`
        self.winograd = winograd
        self.atrous_convs = [m for m in model.modules() if isinstance(m, AtrousConv2d)] if winograd or int8_products else []
        self._previous_tiles: dict[int, Any] = {}

    def __enter__(self) -> TrainingConvolutions:
        for conv in self.convs:
            conv._conv_forward = functools.partial(self._conv_forward, conv)
        for conv in self.upsampling_convs:
            conv._upsampling_conv = functools.partial(self._upsampling_conv, conv)
        for conv in self.doubling_convs:
            self._previous_tiles[id(conv)] = conv.__dict__.get("winograd_tile")
            conv.winograd_tile = _doubling_tile
        for conv in self.atrous_convs:
            if self.winograd:
                self._previous_tiles[id(conv)] = conv.__dict__.get("winograd_tile")
                conv.winograd_tile = functools.partial(_atrous_tile, tuple(conv.dilation))
            if self.int8_products:
                conv.int8_windows = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for conv in self.convs:
            del conv._conv_forward  # the class's own again
        for conv in self.upsampling_convs:
            del conv._upsampling_conv
        for conv in self.doubling_convs + (self.atrous_convs if self.winograd else []):  # the rule before, if any
            del conv.winograd_tile
            if self._previous_tiles.get(id(conv)) is not None:
                conv.winograd_tile = self._previous_tiles[id(conv)]
        for conv in self.atrous_convs if self.int8_products else []:
            del conv.int8_windows  # the class's False again

    def _conv_forward(self, conv: nn.Conv2d, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        training = trains(conv, input)
        if self.int8_products and training and takes_int8_pointwise(conv, input):
            return int8_pointwise_conv(input, weight, bias, conv.stride[0])
        tile = call_output_tile(input, weight, conv.dilation[0], training) if id(conv) in self.winograd_convs else None
        if tile is not None and torch.is_autocast_enabled("cpu"):
            return _autocast_winograd(input, weight, bias, conv.dilation[0], tile)
        if tile is not None:
            return winograd_conv3x3(input, winograd_filters(weight, tile), bias, conv.dilation[0])
        if self.tuned_weight_gradients and training and takes_tuned_weight_gradient(input, weight, conv.groups):
            settings = ConvSettings(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), groups=conv.groups)
            return tuned_convolution(input, weight, bias, settings, self.timed)
        return nn.Conv2d._conv_forward(conv, input, weight, bias)

    def _upsampling_conv(self, caller: UpsamplingConvCaller, x: torch.Tensor, transposed_weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
        if records_gradients(x, transposed_weight) and takes_tuned_weight_gradient(x, transposed_weight, 1):
            return tuned_convolution(x, transposed_weight, bias, _UPSAMPLING, self.timed)
        return UpsamplingConvCaller._upsampling_conv(x, transposed_weight, bias)


def _doubling_tile(x: torch.Tensor, weight: torch.Tensor) -> int | None:
    """`UpsamplingConvCaller.winograd_tile` in the training route: the training rule for calls
    that record gradients, the inference one for the others."""
    return upsampling_output_tile(x, weight, records_gradients(x, weight))


def _atrous_tile(dilation: tuple[int, int], x: torch.Tensor, weight: torch.Tensor) -> int | None:
    """`AtrousConv2d.winograd_tile` in the training route: a float32 weight, and the call where
    `atrous_call_tile` says Winograd saves over the windows (float32 input: the bf16 rule is
    inference's)."""
    return atrous_call_tile(x, weight.shape, dilation) if x.dtype == weight.dtype == torch.float32 else None


def _autocast_winograd(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int,
                       tile: int) -> torch.Tensor:
    """Winograd's convolution as autocast would run the direct one: input, weight and bias cast
    to autocast's dtype, the filters transformed from the cast weight (in float32, outside
    autocast, which would round the transform's sums to bf16 as well; from a float32 weight
    by the native transform, which casts its taps itself)."""
    dtype = torch.get_autocast_dtype("cpu")
    with torch.autocast("cpu", enabled=False):
        filters = winograd_filters(weight, tile, dtype)
        return winograd_conv3x3(input.to(dtype), filters, None if bias is None else bias.to(dtype), dilation)


def training_convolutions(model: nn.Module, device: torch.device | str, precision: str | int,
                          enabled: bool = True, *, winograd: bool = True,
                          tuned_weight_gradients: bool = True, deterministic: bool = False,
                          int8_products: bool = False) -> ContextManager:
    """`TrainingConvolutions(model)` for training on the CPU (when `enabled`; build it once and
    enter it at each step): in float32 the whole route; under bf16 autocast Winograd's F(2x2)
    for the wider 3x3 convolutions (`bf16_pays`), the rest autocast's (the tuned weight
    gradients are float32's); `int8_products` in float32 only. Elsewhere a context that changes
    nothing (GPUs have their own algorithms)."""
    device = torch.device(device)
    name = resolve_precision(precision, device).name if enabled and device.type == "cpu" else None
    if name == "32":
        return TrainingConvolutions(model, winograd=winograd, tuned_weight_gradients=tuned_weight_gradients,
                                    deterministic=deterministic, int8_products=int8_products)
    if name == "bf16" and winograd:
        return TrainingConvolutions(model, tuned_weight_gradients=False)
    return contextlib.nullcontext()
