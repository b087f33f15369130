"""The soft overlap losses' sums from each pixel's softmax, and their gradient, in one native
pass each way (CPU; `seglab.ops.native.overlap_sums`, `overlap.c`).

Dice, Jaccard and Tversky (`seglab.losses.overlap`) in the multiclass mode reduce the softmax P
and the one-hot target Y to three sums per class (and image): <Y, P>, |P| (L1 or squared L2)
and |Y|. PyTorch's operators take the softmax, mask the ignored pixels, gather the true class,
scatter-add twice and sum, then run the backward of each: ~10 passes over the logits' size. On
4 x 21 x 512 x 512 float32 logits (one thread of a 2-core Zen 4), the Dice loss alone took 127
ms forward and backward against cross-entropy's 55. Here the forward reads the logits once
(the sums in float64 per chunk, added in order: the same at any thread count) and the backward
reads them once more, recomputes the softmax and writes the gradient; nothing of the logits'
size is kept but the logits themselves.

`takes_native_overlap_sums` says when a call qualifies: CPU logits (float32 or bf16) whose
classes are contiguous per pixel (channels-last maps), 1 to `native.OVERLAP_MAX_CLASSES`
classes, an integer target of the spatial shape, no tracer, the native kernels built.
`seglab.losses._inputs.multiclass_overlap_sums` takes this route itself.

`native_cross_entropy_overlap_sums` adds softmax cross-entropy to the same two passes, for a
sum such as `ce+dice` (`seglab.losses.WeightedSum`): the forward sums its loss beside the
overlap's sums, the backward adds its gradient to theirs, in float32, and writes one gradient,
rounded once to the logits' dtype. Apart, cross-entropy's own pass writes a gradient of the
logits' size and autograd adds the two; on bf16 logits each would be rounded to bf16 before
that sum, so the trainer hands such a sum a float32 copy, which this route does not need.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from seglab.ops import native
from seglab.ops.grad_mode import records_gradients
from seglab.ops.tracing import being_traced

__all__ = ["native_cross_entropy_overlap_sums", "native_overlap_sums", "takes_native_overlap_sums"]


def takes_native_overlap_sums(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether `native_overlap_sums` computes the multiclass overlap sums of these inputs here."""
    return (logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) and logits.dim() >= 3
            and 1 <= logits.shape[1] <= native.OVERLAP_MAX_CLASSES and logits.numel() > 0
            and not target.is_floating_point() and not target.is_complex()
            and tuple(target.shape) == (logits.shape[0], *logits.shape[2:])
            and logits.movedim(1, -1).is_contiguous() and not being_traced() and native.available())


def _pixels(logits: torch.Tensor) -> torch.Tensor:
    """N x S x K: a view, the classes being contiguous."""
    return logits.movedim(1, -1).reshape(logits.shape[0], -1, logits.shape[1])


def _logits_gradient(ctx, grad_intersection: torch.Tensor | None, grad_predicted: torch.Tensor | None,
                     cross_entropy_scale: float = 0.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The backward pass of the sums (and cross-entropy's, scaled by `cross_entropy_scale`) saved
    in `ctx`, in the logits' own layout (a view of the N x S x K gradient)."""
    logits, target = ctx.saved_tensors
    shape = (logits.shape[0], logits.shape[1])
    grad_intersection = torch.zeros(shape) if grad_intersection is None else grad_intersection
    grad_predicted = torch.zeros(shape) if grad_predicted is None else grad_predicted
    grad = native.overlap_sums_backward(_pixels(logits), target, grad_intersection, grad_predicted, ctx.ignore_index,
                                        squared=ctx.squared, cross_entropy_scale=cross_entropy_scale, weight=weight)
    return grad.view(logits.shape[0], *logits.shape[2:], logits.shape[1]).movedim(-1, 1)


class _NativeOverlapSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None,
                squared: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sums = native.overlap_sums(_pixels(logits), target, ignore_index, squared=squared)
        ctx.save_for_backward(logits, target)
        ctx.ignore_index, ctx.squared = ignore_index, squared
        ctx.mark_non_differentiable(sums[2])  # |Y| counts pixels
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_intersection: torch.Tensor | None, grad_predicted: torch.Tensor | None,
                 _grad_actual: torch.Tensor | None) -> tuple[torch.Tensor, None, None, None]:
        return _logits_gradient(ctx, grad_intersection, grad_predicted), None, None, None


def native_overlap_sums(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None,
                        squared: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """<Y, P>, |P| (the probabilities squared first with `squared`) and |Y| per image and class
    (three N x K float32 tensors) of the softmax of `logits` (N x K x ...) and the one-hot of
    `target` (N x ...), pixels whose target is `ignore_index` left out; differentiable with
    respect to the logits where gradients are recorded. The caller checks
    `takes_native_overlap_sums` first."""
    target = target.reshape(target.shape[0], -1).long().contiguous()
    if records_gradients(logits):
        return _NativeOverlapSums.apply(logits, target, ignore_index, squared)
    return native.overlap_sums(_pixels(logits), target, ignore_index, squared=squared)


class _NativeCrossEntropyOverlapSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                ignore_index: int | None, squared: bool) -> tuple[torch.Tensor, ...]:
        loss, counted, *sums = native.cross_entropy_overlap_sums(_pixels(logits), target, weight, ignore_index,
                                                                 squared=squared)
        ctx.save_for_backward(logits, target)
        ctx.weight, ctx.counted, ctx.ignore_index, ctx.squared = weight, float(counted), ignore_index, squared
        ctx.mark_non_differentiable(sums[2])
        return (loss.float(), *sums)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor | None, grad_intersection: torch.Tensor | None,
                 grad_predicted: torch.Tensor | None, _grad_actual: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        # d(mean loss)/d(logit) = w_t (p - onehot(t)) / W: the kernel's scale is the loss's gradient over W.
        scale = 0.0 if grad_loss is None or ctx.counted == 0 else float(grad_loss) / ctx.counted
        return _logits_gradient(ctx, grad_intersection, grad_predicted, scale, ctx.weight), None, None, None, None


def native_cross_entropy_overlap_sums(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                                      ignore_index: int | None, squared: bool
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross-entropy, <Y, P>, |P|, |Y|): `F.cross_entropy(logits, target, weight,
    ignore_index=...)` (the mean reduction, 0 where every pixel is ignored; a float32 scalar)
    and `native_overlap_sums`' three N x K sums, from one pass over the logits (and one back),
    differentiable with respect to the logits. The caller checks `takes_native_overlap_sums`."""
    target = target.reshape(target.shape[0], -1).long().contiguous()
    if weight is not None:
        weight = weight.float().contiguous()
    if records_gradients(logits):
        return _NativeCrossEntropyOverlapSums.apply(logits, target, weight, ignore_index, squared)
    loss, _, *sums = native.cross_entropy_overlap_sums(_pixels(logits), target, weight, ignore_index, squared=squared)
    return (loss.float(), *sums)
