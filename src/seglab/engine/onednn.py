"""Convolutions as oneDNN runs them best on the CPU, for inference.

PyTorch's eager `conv2d` on the CPU calls oneDNN one operator at a time, and reorders the
weight from PyTorch's layout into oneDNN's blocked layout at every call; what follows the
convolution (a ReLU) is another pass over the output. torch.compile's freezing pass does both
once, ahead of time; here they are done without compiling:

- `FusedConv`: a Conv2d whose activation (ReLU, or GELU exact or tanh) runs inside the
  convolution kernel as a post-op, and whose weight, with `prepack`, is reordered once, at the
  first call, and kept until the weight changes.
- `prepack_conv_weights`: every `FusedConv` packs, and every other plain Conv2d becomes a
  `FusedConv` without a post-op, so its weight, too, is reordered once. In bf16 a 512-channel
  3x3 convolution on the 16 x 16 map of a ResNet's last stage (a 512 x 512 input) took 3.7 ms
  with the reorder and 3.0 ms without (2 threads, Zen 4); larger maps gain 1-4%.

- A residual: `FusedConv(conv, relu)(x, residual)` computes relu(conv(x) + residual) with the
  addition, too, a post-op (oneDNN's binary fusion), so a ResNet block's output is written once
  instead of being written, read back for the shortcut and again for the ReLU
  (`seglab.engine.residual` rewrites timm's blocks to call it). On a Zen 4 the fused operator
  took as long as the three steps; on a Xeon with AMX, bf16, batch 1: 2.1 against 2.6 ms for
  64 channels at 128 x 128, and a whole ResNet-34 trunk 1% less time (4% at batch 8).

- Winograd (`winograd = True`, set by `seglab.engine.fastpath.use_winograd`): a float32 3x3
  convolution with many channels computed by Winograd's F(4x4, 3x3) or F(6x6, 3x3)
  (`seglab.ops.winograd`), with the same residual and activation after it, for inputs large
  enough to pay (`seglab.engine.winograd`, which also picks the tile): 4-5x fewer
  multiply-adds than oneDNN's direct kernel, which on a
  processor without bf16 already runs at the machine's float32 rate (docs/bench.md). In bf16,
  the wider ones (`bf16_pays`: 128 channels and more, over enough tiles) by F(2x2, 3x3), 2.25x fewer, with
  float32 transforms around bf16 products.

Outside CPU inference (a GPU, gradients enabled) the modules compute the same thing with
plain PyTorch operators. The packed weight gives bitwise the same results as the plain one.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from seglab.engine.winograd import call_output_tile
from seglab.ops.atrous_gemm import AtrousConv2d
from seglab.ops.conv import PointwiseConv2d
from seglab.ops.grad_mode import records_gradients
from seglab.ops.kept import KeptFromWeights
from seglab.ops.planar_conv import arranged_weights, planar_conv3x3, planar_conv_fits
from seglab.ops.winograd import winograd_conv3x3, winograd_filters

__all__ = ["PLAIN_IN_INFERENCE", "FusedConv", "WinogradConvForward", "fusable_conv", "onednn_available",
           "prepack_conv_weights", "replace_submodule"]


def onednn_available() -> bool:
    mkldnn = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_convolution_pointwise") \
        and hasattr(mkldnn, "_reorder_convolution_weight")


# Conv2d subclasses whose inference forward is the plain convolution (they only train
# differently), so inference rewrites may take them like nn.Conv2d.
PLAIN_IN_INFERENCE = (nn.Conv2d, AtrousConv2d, PointwiseConv2d)


def fusable_conv(conv: nn.Module) -> bool:
    """A plain Conv2d (or one of `PLAIN_IN_INFERENCE`) that `FusedConv` can take over, zero
    padding given as numbers (oneDNN's fused operator has no "same" or reflect padding)."""
    return type(conv) in PLAIN_IN_INFERENCE and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, module)


def _post_op(activation: nn.Module | None) -> tuple[str, str]:
    if activation is None:
        return "none", ""
    if isinstance(activation, nn.GELU):
        return "gelu", activation.approximate  # "none" (erf) or "tanh"
    if isinstance(activation, nn.ReLU):
        return "relu", ""
    raise ValueError(f"FusedConv fuses ReLU or GELU, not {type(activation).__name__}")


def _conv_output_shape(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, ...]:
    spatial = [(size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1 for size, pad, dil, kernel, stride
               in zip(x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride)]
    return (x.shape[0], conv.out_channels, *spatial)


class FusedConv(nn.Conv2d):
    """The Conv2d `conv` (same parameters, shared), plus the residual given to forward if any,
    followed by `activation` (ReLU, GELU or None): one oneDNN kernel on the CPU in inference;
    with `prepack` the weight is reordered into oneDNN's layout at the first call and kept
    until the weight changes."""

    def __init__(self, conv: nn.Conv2d, activation: nn.Module | None = None, *, prepack: bool = False) -> None:
        if not fusable_conv(conv):
            raise ValueError(f"FusedConv takes a plain zero-padded nn.Conv2d, not {conv!r}")
        # Built on the meta device and given the convolution's own parameters: nothing is copied.
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self.activation = activation
        self.post_op = _post_op(activation)
        self.prepack = prepack
        self._packed: KeptFromWeights[torch.Tensor] = KeptFromWeights()
        self.winograd = False  # by Winograd where the call pays, set by `seglab.engine.fastpath.use_winograd`
        self._winograd_filters: KeptFromWeights[torch.Tensor] = KeptFromWeights()
        # vectors along the pixels (few outputs: a head's classes), set by `seglab.engine.fastpath.use_planar_heads`
        self.planar = False
        self._planar_weights: KeptFromWeights[tuple[torch.Tensor, torch.Tensor]] = KeptFromWeights()
        # 8-bit products (`seglab.engine.int8.Int8Convolution`), set by `seglab.engine.int8.use_int8_convolutions`
        self.int8: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    def _onednn_weight(self, x: torch.Tensor) -> torch.Tensor:
        # The blocked layout suits channels-last input; an NCHW input keeps NCHW with the plain weight.
        if not self.prepack or not x.is_contiguous(memory_format=torch.channels_last):
            return self.weight
        # The packed layout does not depend on the input's size: one serves all (x's shape only hints).
        return self._packed.get([self.weight], lambda: torch.ops.mkldnn._reorder_convolution_weight(
            self.weight, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape)))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """activation(conv(x)), or activation(conv(x) + residual) with a residual."""
        inference = not records_gradients(self.weight)
        if (self.int8 is not None and inference and x.device.type == "cpu" and x.dim() == 4
                and x.dtype in (torch.float32, torch.uint8)):  # uint8: levels a chained int8 producer wrote
            return self.int8(x, residual)
        # oneDNN's fused kernels take batched maps only; an unbatched C x H x W one goes as nn.Conv2d takes it.
        if x.device.type != "cpu" or not inference or x.dtype != self.weight.dtype or x.dim() != 4:
            return self._unfused(x, residual)
        if (self.planar and residual is None and self.post_op[0] in ("none", "relu")
                and planar_conv_fits(x, self.weight)):
            taps, biases = self._planar_weights.get([self.weight] + ([] if self.bias is None else [self.bias]),
                                                    lambda: arranged_weights(self.weight, self.bias))
            return planar_conv3x3(x, taps, biases, self.out_channels, relu=self.post_op[0] == "relu")
        tile = call_output_tile(x, self.weight, self.dilation[0], training=False) if self.winograd else None
        if tile is not None:
            filters = self._winograd_filters.get([self.weight], lambda: winograd_filters(self.weight, tile), tile)
            # The residual and a ReLU in the output transform's pass (`winograd_conv3x3`).
            relu = isinstance(self.activation, nn.ReLU)
            y = winograd_conv3x3(x, filters, self.bias, self.dilation[0], residual=residual, relu=relu)
            return y if relu or self.activation is None else self.activation(y)
        attr, algorithm = self.post_op
        weight, padding, stride, dilation = self._onednn_weight(x), list(self.padding), list(self.stride), list(self.dilation)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, self.bias, padding, stride, dilation, self.groups, attr, [], algorithm)
        # oneDNN's binary fusion takes ReLU or nothing after the addition, and operands alike.
        if (attr not in ("relu", "none") or residual.dtype != x.dtype
                or tuple(residual.shape) != _conv_output_shape(self, x)
                or not x.is_contiguous(memory_format=torch.channels_last)
                or not residual.is_contiguous(memory_format=torch.channels_last)):
            return self._unfused(x, residual)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, weight, self.bias, padding, stride, dilation, self.groups,
            "add", 1.0, "relu" if attr == "relu" else None, [], "")

    def _unfused(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self._finish(self._conv_forward(x, self.weight, self.bias), residual)

    def _finish(self, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The residual and activation after the convolution's own fresh output `y`."""
        if residual is not None:
            y += residual
        return y if self.activation is None else self.activation(y)

    def extra_repr(self) -> str:
        winograd = ", winograd=True" if self.winograd else ""
        planar = ", planar=True" if self.planar else ""
        int8 = ", int8=True" if self.int8 is not None else ""
        return f"{super().extra_repr()}, post_op={self.post_op[0]}, prepack={self.prepack}{winograd}{planar}{int8}"


class WinogradConvForward:
    """A `_conv_forward` for one Conv2d subclass instance that `FusedConv` cannot take over
    (`NearestUpsampleConv`, whose forward calls `_conv_forward` with a share of its weight):
    CPU inference by Winograd where the call pays (`call_output_tile`), with the
    filters kept per weight tensor; anything else by the class's own `_conv_forward`."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        self._filters: KeptFromWeights[torch.Tensor] = KeptFromWeights()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        inference = not records_gradients(weight)
        tile = call_output_tile(x, weight, self.conv.dilation[0], training=False) if inference else None
        if tile is None:
            return type(self.conv)._conv_forward(self.conv, x, weight, bias)
        # Kept per state of the module's parameter (the weight passed in may be a share of it
        # built under inference mode, which has no version counter) and per passed tensor.
        filters = self._filters.get([self.conv.weight], lambda: winograd_filters(weight, tile), tile,
                                    weight.data_ptr(), tuple(weight.shape))
        return winograd_conv3x3(x, filters, bias, self.conv.dilation[0])


def prepack_conv_weights(model: nn.Module) -> int:
    """Have every convolution oneDNN runs keep its weight in oneDNN's layout: `FusedConv`s get
    `prepack`, plain Conv2d modules become `FusedConv`s without post-ops, in place (inference;
    the weights are packed at the first call). Returns the number of convolutions packed."""
    if not onednn_available():
        return 0
    packed = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedConv):
            module.prepack = True
        elif name and fusable_conv(module):
            replace_submodule(model, name, FusedConv(module, prepack=True))
        else:
            continue
        packed += 1
    return packed
