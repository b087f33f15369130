"""A convolution whose weight gradient runs by the fastest of four CPU kernels, chosen by
timing the first call of each shape (as cuDNN's benchmark mode chooses its algorithms).

A convolution's backward computes two gradients. oneDNN's float32 gradient of the weight on a
channels-last input runs far below its forward: on an AVX2 EPYC (Zen 3, 2 threads) 29-33
GFLOP/s for 3x3 convolutions of 16-64 channels, against 94-151 for the forward and 53-69 for the
same gradient on NCHW input (docs/bench.md). The same gradient four ways:

- `"onednn"`: as eager PyTorch computes it, together with the input's gradient in one call;
- `"channels_first"`: the input and the output's gradient copied to NCHW, then oneDNN; the
  copies cost a pass over two maps;
- `"im2col"`: PyTorch's own kernel (oneDNN off for the call): per image, the input's patches
  as columns, then one BLAS product with the output's gradient;
- `"taps"` (stride 1 only): one product per kernel tap over the padded channels-last map's
  rows (`seglab.ops.tap_gradient`), no column buffer.

Which is fastest depends on the channels, the map and the processor. Backward of a UNet-R34
decoder convolution, 64 -> 32 channels on 256 x 256 at batch 4: 500 ms by oneDNN, 299 ms
through NCHW, 274 ms by im2col; 32 -> 16 on 512 x 512: 357, 373 and 1028 ms. So the first
backward of each shape (channels, kernel, settings, and the batch's pixels to a power of two)
times each kernel that takes its settings (twice where the first call came within 2x of the
fastest) and keeps the fastest for the process; small gradients, where the timing costs more
than any kernel could save, keep oneDNN's. The input's gradient is oneDNN's in every case.

im2col writes the patches of one image into a buffer of C_in x k x k x output pixels floats
(C_out x k x k x input pixels for a transposed convolution), fresh at every call. Above
`MAX_IM2COL_BYTES` it is not timed: on a KVM guest whose freed memory goes back to the host,
such a buffer is paged in again at some calls and not others, so a quick timing says nothing
of the next step. Measured on a Zen 3 EPYC, 2 threads, six calls in a row: 32 -> 16 on
512 x 512 (302 MB of columns) 7839 ms, then 772, 3010, 765, 3953, 817 ms; a UNet-R34 training step whose 64 -> 32
convolution on 256 x 256 (151 MB) had been timed fastest by im2col ran it in 1.64 s, where
oneDNN through NCHW took 0.14-0.16 s. Buffers of 64 MB and less timed steadily.

The kernels sum in different orders, so the weight gradient differs from eager PyTorch's at
float32 rounding level, and a choice made by timing can differ between runs: two processes
training UNet-R34 for five steps from the same seed ended with different weights (in the last
bits, which training then amplifies). With `timed=False` the kernel is fixed instead, by
`FIXED_METHOD` for every gradient the timing would be for: the same run gives the same bits
(the trainer's `--deterministic`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from seglab.ops.layout import channel_sums, in_layout_of
from seglab.ops.tap_gradient import tap_weight_gradient

__all__ = [
    "METHODS",
    "MAX_IM2COL_BYTES",
    "MIN_TUNED_FLOPS",
    "RETIME_WITHIN",
    "FIXED_METHOD",
    "ConvSettings",
    "candidates",
    "chosen_methods",
    "clear_choices",
    "takes_tuned_weight_gradient",
    "tuned_convolution",
    "weight_gradient",
    "weight_gradient_by",
]

METHODS = ("onednn", "channels_first", "im2col", "taps")
MIN_TUNED_FLOPS = 50_000_000  # a weight gradient below this keeps oneDNN's kernel, untimed
RETIME_WITHIN = 2.0  # kernels whose first call took at most this multiple of the fastest's run again
MAX_IM2COL_BYTES = 64 << 20  # im2col's column buffer above which it is not a candidate
# The kernel without timing: oneDNN's fast NCHW gradient, never far from the fastest where
# im2col or the taps win and the one kernel with no column buffer to page in.
FIXED_METHOD = "channels_first"


@dataclass(frozen=True)
class ConvSettings:
    """A convolution's settings, as `torch.ops.aten.convolution` takes them."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    transposed: bool = False
    output_padding: tuple[int, int] = (0, 0)
    groups: int = 1

    def arguments(self) -> tuple[Any, ...]:
        return (list(self.stride), list(self.padding), list(self.dilation), self.transposed,
                list(self.output_padding), self.groups)


@dataclass
class _Choice:
    method: str
    seconds: dict[str, float]  # the fastest timed call of each kernel; empty when untimed


_choices: dict[tuple[Any, ...], _Choice] = {}


def chosen_methods() -> dict[tuple[Any, ...], tuple[str, dict[str, float]]]:
    """Every shape's choice so far: key -> (method, seconds per kernel as timed)."""
    return {key: (choice.method, dict(choice.seconds)) for key, choice in _choices.items()}


def clear_choices() -> None:
    """Forget the choices (the next backward of each shape times the kernels again)."""
    _choices.clear()


def _key(input: torch.Tensor, weight: torch.Tensor, settings: ConvSettings) -> tuple[Any, ...]:
    n, channels, height, width = input.shape
    pixel_scale = (n * height * width).bit_length()  # shapes within 2x of each other share a choice
    layout = input.is_contiguous(memory_format=torch.channels_last)
    return (channels, tuple(weight.shape), settings, pixel_scale, layout, input.dtype, torch.get_num_threads())


def weight_gradient_by(method: str, grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                       settings: ConvSettings) -> torch.Tensor:
    """The convolution's weight gradient by one of `METHODS`."""
    mask = [False, True, False]
    if method == "taps":
        if not _takes_taps(settings):
            raise ValueError(f"the taps kernel computes stride-1 convolutions, not {settings}")
        return tap_weight_gradient(grad_output, input, tuple(weight.shape[2:]), settings.padding, settings.dilation)
    if method == "channels_first":
        grad_output, input, weight = grad_output.contiguous(), input.contiguous(), weight.contiguous()
    if method == "im2col":
        enabled = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False  # (its `flags()` context also resets TF32, with a warning)
        try:
            return torch.ops.aten.convolution_backward(grad_output, input, weight, None, *settings.arguments(), mask)[1]
        finally:
            torch.backends.mkldnn.enabled = enabled
    return torch.ops.aten.convolution_backward(grad_output, input, weight, None, *settings.arguments(), mask)[1]


def _weight_gradient_flops(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                           settings: ConvSettings) -> int:
    # One multiply-add per weight element and per pixel of the map on the convolution's output side.
    map_pixels = input[:, 0].numel() if settings.transposed else grad_output[:, 0].numel()
    return 2 * weight.numel() * map_pixels


def _im2col_bytes(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                  settings: ConvSettings) -> int:
    """The size of im2col's column buffer for one image: a patch of weight[0]'s size (C_in x k x k;
    C_out x k x k for a transposed convolution's C_in x C_out x k x k weight) per pixel of the
    output's map (of the input's, for a transposed convolution)."""
    pixels = input[0, 0].numel() if settings.transposed else grad_output[0, 0].numel()
    return weight[0].numel() * pixels * input.element_size()


def _takes_taps(settings: ConvSettings) -> bool:
    return not settings.transposed and settings.stride == (1, 1) and settings.groups == 1


def candidates(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
               settings: ConvSettings) -> list[str]:
    """The kernels timed for this convolution: im2col where its column buffer is at most
    `MAX_IM2COL_BYTES`, the taps for stride-1 convolutions, the other two always."""
    allowed = {"onednn", "channels_first"}
    if _im2col_bytes(grad_output, input, weight, settings) <= MAX_IM2COL_BYTES:
        allowed.add("im2col")
    if _takes_taps(settings):
        allowed.add("taps")
    return [method for method in METHODS if method in allowed]


def _timed(call: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def _tune(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
          settings: ConvSettings) -> tuple[_Choice, torch.Tensor]:
    """Time every kernel once, then again those within `RETIME_WITHIN` of the fastest first
    call (a first call also pays for its fresh memory); the fastest one's choice and its
    gradient."""
    seconds: dict[str, float] = {}
    results: dict[str, torch.Tensor] = {}

    def time_call(method: str) -> None:
        elapsed, results[method] = _timed(lambda: weight_gradient_by(method, grad_output, input, weight, settings))
        seconds[method] = min(elapsed, seconds.get(method, math.inf))

    for method in candidates(grad_output, input, weight, settings):
        try:
            time_call(method)
        except RuntimeError:  # another kernel that does not take these settings drops out
            if method == "onednn":  # eager PyTorch's own: its error is the caller's
                raise
    first_best = min(seconds.values())
    for method in [m for m, elapsed in seconds.items() if elapsed <= RETIME_WITHIN * first_best]:
        time_call(method)
    fastest = min(seconds, key=seconds.__getitem__)
    return _Choice(fastest, seconds), results[fastest]


def _untimed_method(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                    settings: ConvSettings) -> str:
    large = _weight_gradient_flops(grad_output, input, weight, settings) >= MIN_TUNED_FLOPS
    return FIXED_METHOD if large else "onednn"


def weight_gradient(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                    settings: ConvSettings, timed: bool = True) -> torch.Tensor:
    """The convolution's weight gradient by the kernel chosen for this shape (timed at its first
    call; with `timed=False` by `FIXED_METHOD`, the same in every run), in the weight's memory
    layout."""
    if not timed:
        method = _untimed_method(grad_output, input, weight, settings)
        return in_layout_of(weight_gradient_by(method, grad_output, input, weight, settings), weight)
    key = _key(input, weight, settings)
    choice = _choices.get(key)
    if choice is None and _weight_gradient_flops(grad_output, input, weight, settings) >= MIN_TUNED_FLOPS:
        _choices[key], result = _tune(grad_output, input, weight, settings)
        return in_layout_of(result, weight)
    if choice is None:
        choice = _choices[key] = _Choice("onednn", {})
    return in_layout_of(weight_gradient_by(choice.method, grad_output, input, weight, settings), weight)


class _TunedConvolution(torch.autograd.Function):
    """oneDNN's forward and input gradient; the weight gradient by `weight_gradient`."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                settings: ConvSettings, timed: bool) -> torch.Tensor:
        ctx.save_for_backward(input, weight)
        ctx.settings, ctx.has_bias, ctx.timed = settings, bias is not None, timed
        return torch.ops.aten.convolution(input, weight, bias, *settings.arguments())

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight = ctx.saved_tensors
        settings = ctx.settings
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if ctx.timed:
            choice = _choices.get(_key(input, weight, settings))
            method = None if choice is None else choice.method
        else:
            method = _untimed_method(grad_output, input, weight, settings)
        # oneDNN computes both gradients in one call where its weight gradient is the choice.
        joint = needs_weight and method == "onednn"
        grad_input = grad_weight = None
        if needs_input or joint:
            grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_output, input, weight, None, *settings.arguments(), [needs_input, joint, False])
        if needs_weight and not joint:
            grad_weight = weight_gradient(grad_output, input, weight, settings, ctx.timed)
        # The bias's gradient as a sum: asked of oneDNN, it runs its weight-gradient kernel
        # (input + bias gradient: 199 ms against 35 without the bias, 64 channels on 128 x 128).
        grad_bias = channel_sums(grad_output) if ctx.has_bias and needs_bias else None
        return grad_input, grad_weight, grad_bias, None, None


def takes_tuned_weight_gradient(input: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether a convolution call is one the tuning is for: a batched float32 input on the CPU
    outside autocast, a dense (ungrouped) kernel. Grouped and depthwise convolutions, bf16 and
    other devices were not measured and keep their kernels."""
    return (input.device.type == "cpu" and input.dtype == weight.dtype == torch.float32 and input.dim() == 4
            and groups == 1 and not torch.is_autocast_enabled("cpu"))


def tuned_convolution(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      settings: ConvSettings, timed: bool = True) -> torch.Tensor:
    """`torch.ops.aten.convolution(input, weight, bias, ...settings)` (a 2-D convolution, or a
    transposed one), differentiable, whose weight gradient runs by the kernel timed fastest for
    its shape, or with `timed=False` by `FIXED_METHOD` (`weight_gradient`)."""
    return _TunedConvolution.apply(input, weight, bias, settings, timed)
