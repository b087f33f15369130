"""Convolutions by 8-bit integer products, for CPU inference (`precision="int8"`).

Processors with VNNI (AVX-512 VNNI, AVX-VNNI, AMX) multiply bytes four to a 32-bit lane and
add the products in one instruction: four times the multiply-adds of float32 per vector. On
a 2-core AVX-512 VNNI Xeon without bf16, oneDNN's int8 1x1 convolution 2048 -> 512 on a
64 x 64 map took 7.0 ms against 28.6 ms in float32 (docs/bench.md). This is post-training
static quantization, done so that only the products are rounded:

- weights: int8 per output channel, symmetric (scale = the channel's largest |w| / 127), with
  the folded BatchNorm already in them;
- a convolution's input: uint8 per tensor, from the smallest and largest value it took on
  the calibration images (zero point 0 for inputs that are never negative, as after a ReLU);
- the products accumulate in int32; the output comes back as float32 with the bias and ReLU
  applied in the same kernel (`torch.ops.onednn.qconv2d_pointwise`), so additions,
  upsamplings, poolings and the heads' softmax between the convolutions stay float32;
- where a convolution's output goes to one other int8 convolution only (a ResNet block's
  first convolutions), the kernel writes it as that convolution's uint8 input levels
  directly (`chain_int8_levels`): the same rounding of the same values, without the float32
  map in between.

What is taken: `FusedConv`s of one group (the float32 fast path's convolutions after BatchNorm
folding and ReLU fusion) with no post-op or a ReLU, and U-Net decoders' `NearestUpsampleConv`s. Depthwise convolutions, the heads that
`use_planar_heads` took (their scores are the output) and anything a calibration image did
not reach stay float32.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.engine.onednn import FusedConv
from seglab.engine.precision import cpu_has
from seglab.ops import native
from seglab.ops.int8_products import INT8_LEVELS
from seglab.ops.nearest_conv import NearestUpsampleConv

__all__ = ["INT8_WEIGHT_LEVELS", "Int8Convolution", "Int8UpsamplingConvolution", "calibrate_int8",
           "chain_int8_levels", "cpu_runs_int8", "input_quantization", "int8_input_ranges",
           "quantize_input", "quantize_weights", "require_int8", "use_int8_convolutions"]

INT8_WEIGHT_LEVELS = INT8_LEVELS  # symmetric: -127..127, so a weight and its negation round alike
_INPUT_LEVELS = 255  # uint8


def cpu_runs_int8() -> bool:
    """True where oneDNN has 8-bit products that sum without saturating (VNNI or AMX): elsewhere
    its u8 x s8 pairs add in int16 and can clip, and int8 is refused."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")
            and (cpu_has("vnni") or cpu_has("amx_tile")))


def require_int8(device: torch.device, option: str = "--precision int8", instead: str = "use --precision 32") -> None:
    """Raise ValueError (one line for the command line, naming `option`) unless int8 runs on
    `device`."""
    if device.type != "cpu" or not cpu_runs_int8():
        raise ValueError(f"{option}: needs a CPU with VNNI or AMX 8-bit products (--device cpu); {instead}")


def input_quantization(low: float, high: float) -> tuple[float, int]:
    """The uint8 (scale, zero point) covering [low, high] (which is widened to hold 0, so that
    zero padding is exact): zero point 0 where nothing was negative."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / _INPUT_LEVELS
    if not scale > 0:  # a constant-zero input (or no calibration value): any scale represents it
        return 1.0, 0
    zero_point = int(round(-low / scale))
    return scale, min(max(zero_point, 0), _INPUT_LEVELS)


def quantize_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights (channels_last) and their float32 scales, one per output channel."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=tuple(range(1, weight.dim()))) / INT8_WEIGHT_LEVELS
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero channel stays zero
    levels = torch.round(weight / scales.view(-1, *[1] * (weight.dim() - 1)))
    levels = levels.clamp(-INT8_WEIGHT_LEVELS, INT8_WEIGHT_LEVELS).to(torch.int8)
    return levels.contiguous(memory_format=torch.channels_last), scales


def quantize_input(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, 0, 255) as uint8, half to even, memory format kept:
    one native pass where the kernels are built, PyTorch's operators (four passes) elsewhere."""
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    if native.available() and dense:
        return native.quantize_u8(x, scale, zero_point)
    return (torch.round(x / scale) + zero_point).clamp_(0, _INPUT_LEVELS).to(torch.uint8)


class Int8Convolution:
    """The int8 form of one `FusedConv` (weights quantized and packed for oneDNN once, input
    scale from calibration): called with a float32 channels-last input (or the uint8 levels a
    chained producer wrote), and the residual the `FusedConv` was given, it returns what the
    float32 convolution returns, float32 (uint8 levels for the next convolution, once chained)."""

    def __init__(self, conv: nn.Conv2d, low: float, high: float) -> None:
        self.input_range = (float(low), float(high))  # as calibrated: what a checkpoint stores
        self.x_scale, self.x_zero_point = input_quantization(low, high)
        levels, self.w_scales = quantize_weights(conv.weight)
        self.w_zero_points = torch.zeros(conv.out_channels, dtype=torch.long)
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.groups = conv.groups
        self._levels: torch.Tensor | None = levels
        self._packed: torch.Tensor | None = None
        self.bias = None if conv.bias is None else conv.bias.detach().float()
        self.relu = getattr(conv, "post_op", ("none",))[0] == "relu"
        # (scale, zero point) of the one int8 convolution that reads the output, set by
        # `chain_int8_levels`: the output is written as that convolution's uint8 levels
        self.output_levels: tuple[float, int] | None = None

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x as uint8 levels of this convolution's input scale (memory format kept)."""
        return quantize_input(x, self.x_scale, self.x_zero_point)

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        """The weights in oneDNN's layout, packed at the first call. Packed without an input
        shape, oneDNN chose a 1x1 kernel that ran at 150-195 GOP/s (2048 -> 512 on 64 x 64)
        against 1,100-1,300 packed for the shape; the first call's shape serves the later ones."""
        if self._packed is None:
            self._packed = torch.ops.onednn.qconv_prepack(self._levels, self.w_scales, self.x_scale, self.x_zero_point,
                                                          self.stride, self.padding, self.dilation, self.groups,
                                                          list(x.shape))
            self._levels = None
        return self._packed

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x float32, or uint8 levels at this input scale (a chained producer's output)."""
        return self.convolve(x if x.dtype == torch.uint8 else self.quantize(x), residual)

    def convolve(self, levels: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of input `levels` (uint8 of this input scale): float32 out, or the
        next convolution's levels where chained and no residual comes."""
        # oneDNN's int8 kernel takes a float32 residual only as an in-place "sum" that ran at
        # half the speed of the plain kernel (512 -> 2048 on 64 x 64: 13.9 against 7.1 ms), so
        # the shortcut is added after it, with the ReLU.
        relu_in_kernel = self.relu and residual is None
        # Levels for the next convolution straight from the kernel: a quarter of the bytes, and
        # no pass to quantize them (the same rounding of the same value).
        as_levels = residual is None and self.output_levels is not None
        out_scale, out_zero_point = self.output_levels if as_levels else (1.0, 0)
        y = torch.ops.onednn.qconv2d_pointwise(
            levels, self.x_scale, self.x_zero_point, self.packed(levels), self.w_scales, self.w_zero_points,
            self.bias, self.stride, self.padding, self.dilation, self.groups, out_scale, out_zero_point,
            None if as_levels else torch.float32, "relu" if relu_in_kernel else "none", [], "")
        if residual is None:
            return y
        if self.relu:  # one pass: ATen's in-place add-ReLU (3.3 against 4.4 ms for add_ then relu_, 32 MB)
            return torch.ops.aten._add_relu_(y, residual)
        return y.add_(residual)

    def __repr__(self) -> str:
        return f"Int8Convolution(x_scale={self.x_scale:.4g}, x_zero_point={self.x_zero_point}, relu={self.relu})"


class Int8UpsamplingConvolution(Int8Convolution):
    """A U-Net decoder step's `NearestUpsampleConv` in int8: the 3x3 convolution over
    cat([nearest_upsample(x), skip]) with x quantized at its own resolution and upsampled as
    bytes (a quarter of the float32 map's), the skip quantized with the same scale (the
    calibrated range covers both), then one int8 convolution. (The float32 path reads x at its
    own resolution through a transposed convolution instead, `seglab.ops.nearest_conv`; at four
    times the float32 rate of multiply-adds the plain convolution is the faster one.)"""

    def __call__(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        levels = F.interpolate(self.quantize(x), size=tuple(size), mode="nearest")
        if skip is not None:
            levels = torch.cat([levels, self.quantize(skip)], dim=1)
        return self.convolve(levels)


def _takes(module: nn.Module) -> bool:
    if isinstance(module, NearestUpsampleConv):
        return module.weight.device.type == "cpu"
    return (isinstance(module, FusedConv) and module.groups == 1 and not module.planar
            and module.post_op[0] in ("none", "relu") and module.weight.device.type == "cpu")


def _calibrated_inputs(module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The inputs a convolution quantizes: x, and a decoder step's skip (a `FusedConv`'s second
    argument is a residual, added after the products)."""
    inputs = [args[0]] if args else []
    if isinstance(module, NearestUpsampleConv):
        inputs.append(args[1] if len(args) > 1 else kwargs.get("skip"))
    return [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]


@torch.no_grad()
def calibrate_int8(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Run `model` (float32, as prepared for inference) on each batch and return, per
    convolution `use_int8_convolutions` would take, the smallest and largest input value it saw."""
    ranges: dict[str, tuple[float, float]] = {}

    def observer(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            for x in _calibrated_inputs(module, args, kwargs):
                low, high = torch.aminmax(x.detach().float())
                seen = ranges.get(name, (float("inf"), float("-inf")))
                ranges[name] = (min(seen[0], float(low)), max(seen[1], float(high)))
        return record

    handles = [module.register_forward_pre_hook(observer(name), with_kwargs=True)
               for name, module in model.named_modules() if _takes(module)]
    try:
        ran = 0
        for batch in batches:
            model(batch)
            ran += 1
        if ran == 0:
            raise ValueError("int8 calibration needs at least one batch of images")
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def chain_int8_levels(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> int:
    """For each (producer, consumer) of `pairs` (modules by name; the producer's output is read
    by the consumer's input and nowhere else, as `seglab.engine.fastpath`'s dataflow recorder
    finds them) where both are int8 convolutions of `FusedConv`s, have the producer write its
    output as uint8 levels of the consumer's input scale. Returns the number chained."""
    chained = 0
    for producer_name, consumer_name in pairs:
        producer, consumer = model.get_submodule(producer_name), model.get_submodule(consumer_name)
        if (isinstance(producer, FusedConv) and isinstance(consumer, FusedConv)
                and type(producer.int8) is Int8Convolution and type(consumer.int8) is Int8Convolution):
            producer.int8.output_levels = (consumer.int8.x_scale, consumer.int8.x_zero_point)
            chained += 1
    return chained


def use_int8_convolutions(model: nn.Module, batches: Iterable[torch.Tensor] | None = None, *,
                          ranges: Mapping[str, tuple[float, float]] | None = None) -> int:
    """Give every convolution that int8 takes (see the module's docstring) its `Int8Convolution`,
    in place, with input scales calibrated on `batches` (float32 images as the model takes
    them) or from `ranges` (a convolution's name -> the smallest and largest input value, as
    `calibrate_int8` returns them, e.g. stored in a checkpoint). Convolutions the batches did not
    reach, or `ranges` does not name, stay float32. Returns the number taken."""
    require_int8(next(model.parameters()).device)
    if (batches is None) == (ranges is None):
        raise ValueError("int8 takes its input scales from calibration batches or from stored ranges (one of them)")
    if ranges is None:
        ranges = calibrate_int8(model, batches)
    modules = dict(model.named_modules())
    for name, (low, high) in ranges.items():
        module = modules.get(name)
        if module is None or not _takes(module):
            raise ValueError(f"int8 ranges name {name!r}, which is not a convolution int8 takes in this model")
        kind = Int8UpsamplingConvolution if isinstance(module, NearestUpsampleConv) else Int8Convolution
        module.int8 = kind(module, low, high)
    return len(ranges)


def int8_input_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """The calibrated input range of each int8 convolution of `model` (as prepared with int8:
    the model inside `optimize_for_inference`'s result), by module name: what
    `use_int8_convolutions(..., ranges=)` takes back."""
    return {name: module.int8.input_range for name, module in model.named_modules()
            if isinstance(getattr(module, "int8", None), Int8Convolution)}
