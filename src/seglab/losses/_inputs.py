"""Shape conventions shared by every loss: the three modes and ignore_index.

    multiclass  logits N x K x H x W, target N x H x W (class indices)
    binary      logits N x 1 x H x W or N x H x W, target N x H x W or N x 1 x H x W (0/1)
    multilabel  logits N x K x H x W, target N x K x H x W (0/1 per label)

Spatial dims may be any number (H x W, D x H x W, or none). Target entries equal to
`ignore_index` are masked out of every loss: they add nothing to sums nor to the pixel counts
used for means, and a batch where everything is ignored gives a loss of 0 (not NaN).
"""
from __future__ import annotations

import torch

from seglab.ops.overlap_sums import native_overlap_sums, takes_native_overlap_sums

MODES = ("multiclass", "binary", "multilabel")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"loss mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def binary_view(logits: torch.Tensor, target: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of equal shape N x C x S for the binary and multilabel modes."""
    if mode == "binary":
        if logits.dim() == target.dim() + 1 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if target.dim() == logits.dim() + 1 and target.shape[1] == 1:
            target = target[:, 0]
        logits, target = logits.unsqueeze(1), target.unsqueeze(1)
    if logits.shape != target.shape:
        raise ValueError(f"{mode} loss needs logits and target of the same shape, got {tuple(logits.shape)} and {tuple(target.shape)}")
    return logits.flatten(2), target.flatten(2)


def valid_mask(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    return torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index


def sigmoid_probabilities_and_targets(
    logits: torch.Tensor, target: torch.Tensor, mode: str, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities, 0/1 targets, validity) as N x C x S of the binary (C = 1) and multilabel
    modes: a sigmoid per channel. The multiclass mode's sums are `multiclass_overlap_sums`."""
    logits, target = binary_view(logits, target, mode)
    valid = valid_mask(target, ignore_index)
    return logits.sigmoid(), target.masked_fill(~valid, 0).to(logits.dtype), valid


def pixel_major_softmax(num_classes: int) -> bool:
    """Whether a softmax over classes runs faster with each pixel's classes contiguous (pixels x
    classes) than across the channel planes: when the classes fill a vector register. On a
    2-core Zen 4, cross-entropy forward + backward: 21 classes on 4 x 512 x 512, channels-last
    logits 353 -> 167 ms as pixels x classes; but 6 classes on 8 x 128 x 128, 5.1 -> 12.6 ms."""
    return num_classes >= 16


def multiclass_overlap_sums(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None, norm: str, per_image: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """<Y,P>, |P| and |Y| per class (N x K per image, else K) of the softmax P and the one-hot Y
    of the class-index target, ignored pixels left out; |P| in the L1 or squared-L2 norm, |Y|
    the same in both (Y is 0/1). The one-hot is never built: <Y,P> adds each pixel's probability
    of its true class to that class, |Y| counts the pixels per class. (Built, it and its
    products were ~10 passes over N x K x S: ce+dice on a 4 x 21 x 512 x 512 batch took ~1 s.)
    With 16 or more classes the softmax runs with each pixel's classes contiguous
    (`pixel_major_softmax`), a view of channels-last logits. On the CPU, channels-last logits
    of up to 1,024 classes take one native pass each way instead (`seglab.ops.overlap_sums`);
    half-precision logits are computed in float32 on either route."""
    if logits.dim() != target.dim() + 1:
        raise ValueError(f"multiclass loss needs logits N x K x ... and target N x ..., got {tuple(logits.shape)} and {tuple(target.shape)}")
    if takes_native_overlap_sums(logits, target):  # one native pass each way on the CPU (seglab.ops.overlap_sums)
        sums = native_overlap_sums(logits, target, ignore_index, norm == "l2")
        return sums if per_image else tuple(term.sum(0) for term in sums)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # in float32, as the native sums compute
    n, num_classes = logits.shape[:2]
    if pixel_major_softmax(num_classes):
        probs = logits.movedim(1, -1).reshape(n, -1, num_classes).softmax(-1)  # N x S x K
    else:
        probs = logits.softmax(1).movedim(1, -1).reshape(n, -1, num_classes)
    valid = valid_mask(target, ignore_index).reshape(n, -1)
    labels = target.reshape(n, -1).masked_fill(~valid, 0).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"target class outside 0..{num_classes - 1} (and not ignore_index={ignore_index})")
    counted = valid.to(probs.dtype)
    if ignore_index is not None:
        probs = probs * counted.unsqueeze(-1)
    true_class = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # N x S, 0 where ignored
    intersection = probs.new_zeros(n, num_classes).scatter_add(1, labels, true_class)
    target_mass = probs.new_zeros(n, num_classes).scatter_add(1, labels, counted)
    predicted_mass = (probs if norm == "l1" else probs * probs).sum(1)
    sums = (intersection, predicted_mass, target_mass)
    return sums if per_image else tuple(term.sum(0) for term in sums)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid entries; 0 (still attached to the graph) when none is valid."""
    values = values * valid
    return values.sum() / valid.sum().clamp(min=1)
