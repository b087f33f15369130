"""BatchNorm in training with what follows it in a ResNet, a shortcut addition and a ReLU, in
two passes over memory each way (CPU, native kernel `batch_norm.c`).

    y = relu(BN(x) + shortcut)

PyTorch runs the norm (two passes each way), the addition and the ReLU as operators of their
own, each reading and writing whole maps; its backward adds threshold_backward's pass. Here
the ReLU's mask is recomputed from x (without a shortcut) or read from y (with one: y is the
next block's input, kept anyway), so the addition and the ReLU cost no pass of their own. On a
2-core Zen 4, forward and backward of BatchNorm + shortcut + ReLU on a 4 x 256 x 128 x 128
bf16 map read from memory: 14.9 -> 9.6 ms (`benchmarks/batch_norm.py`, docs/bench.md).

`batch_norm_act(x, norm, relu=..., shortcut=...)` computes it for an `nn.BatchNorm2d` in
training (its running statistics updated as the module would) when `takes_native_batch_norm`
says the call qualifies: a CPU channels-last bf16 map (autocast's; float32 ones measured
slower than PyTorch's), more than one value per channel, float32 parameters, no tracer, the
native kernels built. The values are PyTorch's to float32 rounding (statistics summed in
float64 across chunks, so independent of the threads); in bf16 the sum and the ReLU see the
float32 norm, not its bf16 rounding.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from seglab.ops import native
from seglab.ops.layout import pixel_rows
from seglab.ops.tracing import being_traced

__all__ = ["batch_norm_act", "batch_norm_act_twice", "takes_native_batch_norm"]


def _channels_last(map_: torch.Tensor) -> bool:
    return map_.dim() == 4 and map_.is_contiguous(memory_format=torch.channels_last)


# The kernels take float32 maps too (`seglab.ops.native.batch_norm_forward`), but their float32
# passes measured slower than PyTorch's norm + addition + ReLU (forward + backward on a
# 4 x 256 x 128 x 128 map: 25.1 against 21.0 ms, Zen 4), where bf16 ones run 1.6x faster: only
# bf16 maps (autocast's) take the route.
_ROUTED_DTYPES = (torch.bfloat16,)


def takes_native_batch_norm(x: torch.Tensor, norm: nn.Module, shortcut: torch.Tensor | None = None) -> bool:
    """Whether `batch_norm_act(x, norm, shortcut=shortcut)` runs natively: `norm` a plain
    nn.BatchNorm2d in training with float32 CPU parameters, `x` (and the shortcut, of x's shape
    and dtype) a CPU channels-last bf16 map with more than one value per channel (PyTorch
    raises its own error on one), outside tracers."""
    if type(norm) is not nn.BatchNorm2d or not norm.training:
        return False
    if not all(p is None or (p.dtype == torch.float32 and p.device.type == "cpu")
               for p in (norm.weight, norm.bias, norm.running_mean, norm.running_var)):
        return False
    if shortcut is not None and (shortcut.shape != x.shape or shortcut.dtype != x.dtype
                                 or shortcut.device != x.device or not _channels_last(shortcut)):
        return False
    return (x.device.type == "cpu" and x.dtype in _ROUTED_DTYPES and _channels_last(x)
            and x.shape[0] * x.shape[2] * x.shape[3] > 1 and not being_traced() and native.available())


class _BatchNormAct(torch.autograd.Function):
    """With `twice`, the output comes as two tensors, y and a view of it, each with its own
    gradient: a block's output read by the next block's first convolution and by its shortcut
    addition. The backward then adds the two gradients as its first pass reads them (rounded to
    the maps' dtype, as autograd's sum would be) instead of autograd adding them in a pass of
    its own (FCN-R50's bf16 training step: 12 of its 17 such sums, which took 20-32 ms)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shortcut: torch.Tensor | None, weight: torch.Tensor | None,
                bias: torch.Tensor | None, norm: nn.BatchNorm2d, relu: bool,
                twice: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        running = norm.training and norm.track_running_stats and norm.running_mean is not None
        momentum = 0.0 if norm.momentum is None else norm.momentum
        if running and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            if norm.momentum is None:  # the cumulative average
                momentum = 1.0 / float(norm.num_batches_tracked)
        # A tensor of its own, not a view of the kernel's rows: the caller may change it in place.
        y = torch.empty_like(x, memory_format=torch.channels_last)
        _, saved = native.batch_norm_forward(
            pixel_rows(x), weight, bias, shortcut=None if shortcut is None else pixel_rows(shortcut), relu=relu,
            running_mean=norm.running_mean if running else None, running_var=norm.running_var if running else None,
            momentum=momentum, eps=norm.eps, out=pixel_rows(y))
        ctx.relu, ctx.has_shortcut = relu, shortcut is not None
        # With a shortcut the backward reads the ReLU's mask from y (the next layer keeps it anyway).
        ctx.save_for_backward(x, y if shortcut is not None and relu else None, saved)
        if not twice:
            return y
        ctx.set_materialize_grads(False)  # an unread output's gradient stays None, not a map of zeros
        return y, y.view_as(y)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x, y, saved = ctx.saved_tensors
        present = [grad.to(x.dtype).contiguous(memory_format=torch.channels_last) for grad in grads if grad is not None]
        if not present:
            return (None,) * 7
        if len(present) == 2 and y is None:  # no mask to read from y: autograd's sum
            present = [present[0] + present[1]]
        grad, grad2 = present[0], present[1] if len(present) == 2 else None
        grad_x = torch.empty_like(x, memory_format=torch.channels_last) if ctx.needs_input_grad[0] else None
        grad_shortcut = torch.empty_like(x, memory_format=torch.channels_last) if y is not None else None
        _, _, grad_weight, grad_bias = native.batch_norm_backward(
            pixel_rows(grad), pixel_rows(x), saved, relu=ctx.relu, y=None if y is None else pixel_rows(y),
            input_gradient=grad_x is not None,
            out=(None if grad_x is None else pixel_rows(grad_x),
                 None if grad_shortcut is None else pixel_rows(grad_shortcut)),
            grad2=None if grad2 is None else pixel_rows(grad2))
        if ctx.has_shortcut and grad_shortcut is None:  # no ReLU: the shortcut's gradient is the output's
            grad_shortcut = grad
        return (grad_x, grad_shortcut,
                grad_weight if ctx.needs_input_grad[2] else None, grad_bias if ctx.needs_input_grad[3] else None,
                None, None, None)


def batch_norm_act(x: torch.Tensor, norm: nn.BatchNorm2d, *, relu: bool = False,
                   shortcut: torch.Tensor | None = None) -> torch.Tensor:
    """relu(norm(x) + shortcut) (the ReLU and the shortcut each optional) with the batch's
    statistics, natively, in x's dtype and layout; the running statistics updated as `norm`
    would. The caller checks `takes_native_batch_norm` first."""
    return _BatchNormAct.apply(x, shortcut, norm.weight, norm.bias, norm, relu)


def batch_norm_act_twice(x: torch.Tensor, norm: nn.BatchNorm2d, *, shortcut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_norm_act(x, norm, relu=True, shortcut=shortcut)` as two tensors, the output and a
    view of it, for two readers (a ResNet block's output: the next block's first convolution
    and its shortcut): the backward adds their gradients in its own first pass, with the same
    bits as autograd's sum. The caller checks `takes_native_batch_norm` first."""
    return _BatchNormAct.apply(x, shortcut, norm.weight, norm.bias, norm, True, True)
