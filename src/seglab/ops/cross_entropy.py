"""Softmax cross-entropy and its gradient in one pass over the logits (CPU, native kernel).

PyTorch's cross-entropy on a bf16 map of logits takes six passes over it and its gradient:
the copy to float32, log-softmax, nll_loss, then the backward of each. On FCN-R50's 4 x 21 x
512 x 512 training batch (a 2-core Zen 4) they took 48 ms of a 1.7 s step; `cross_entropy.c`
takes 15 ms. The loss's forward computes the gradient too (the softmax is at hand then) and
keeps it, in the logits' dtype, until the backward hands it on, scaled by the incoming
gradient. That keeps one map of the logits' size, where PyTorch keeps the float32
log-softmax.

`takes_native_cross_entropy` says when a call qualifies: CPU logits (float32 or bf16) whose
classes are contiguous per pixel (channels-last maps, or pixels x classes), at most
`MAX_CLASSES` classes, no label smoothing, no tracer, the native kernels built. seglab's
`CrossEntropyLoss` takes this route itself; everything else keeps PyTorch's.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from seglab.ops import native
from seglab.ops.grad_mode import records_gradients
from seglab.ops.tracing import being_traced

__all__ = ["native_cross_entropy", "takes_native_cross_entropy"]


def takes_native_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> bool:
    """Whether `native_cross_entropy` computes F.cross_entropy(logits, target, ...) here."""
    return (logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
            and logits.dim() >= 2 and 1 <= logits.shape[1] <= native.MAX_CLASSES and logits.numel() > 0
            and label_smoothing == 0.0 and not target.is_floating_point()
            and tuple(target.shape) == (logits.shape[0], *logits.shape[2:])
            and logits.movedim(1, -1).is_contiguous() and not being_traced() and native.available())


def _pixels_by_classes(logits: torch.Tensor) -> torch.Tensor:
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])  # a view: the classes are contiguous


class _NativeCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                ignore_index: int) -> torch.Tensor:
        loss, gradient = native.cross_entropy(_pixels_by_classes(logits), target, weight, ignore_index)
        # In the logits' own layout (a view of the pixels x classes gradient).
        ctx.gradient = gradient.view(*logits.shape[:1], *logits.shape[2:], logits.shape[1]).movedim(-1, 1)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        # Handed on without a copy, so it can be used once: the engine may keep the tensor as
        # the leaf's .grad and add later gradients into it.
        gradient, ctx.gradient = ctx.gradient, None
        if gradient is None:
            raise RuntimeError("seglab's native cross-entropy hands on its gradient once; compute the loss again "
                               "to backpropagate through it a second time")
        if float(grad_output) != 1.0:
            gradient.mul_(grad_output)  # in float32, rounded once to a bf16 gradient's dtype
        return gradient, None, None, None


def native_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                         ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(logits, target, weight, ignore_index=ignore_index) (the mean reduction,
    0 when every pixel is ignored), computed in float32 whatever the logits' dtype, returned as
    a float32 scalar. The caller checks `takes_native_cross_entropy` first."""
    target = target.reshape(-1).long().contiguous()
    if weight is not None:
        weight = weight.float().contiguous()
    if records_gradients(logits):
        return _NativeCrossEntropy.apply(logits, target, weight, ignore_index)
    return native.cross_entropy(_pixels_by_classes(logits), target, weight, ignore_index, gradient=False)[0]
