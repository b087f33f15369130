"""Soft IoU and soft Dice on probabilities, in the L1 and squared-L2 forms.

With Y the (one-hot) ground truth and P the predicted probabilities of one class:

    L1 form   soft IoU  = <Y,P> / (|Y|_1 + |P|_1 - <Y,P>)       (Rahman & Wang 2016)
              soft Dice = 2 <Y,P> / (|Y|_1 + |P|_1)
    L2 form   soft IoU  = <Y,P> / (|Y|_2^2 + |P|_2^2 - <Y,P>)
              soft Dice = 2 <Y,P> / (|Y|_2^2 + |P|_2^2)          (Milletari et al., V-Net, 2016)

Both equal the hard IoU / Dice when P is 0/1, and Dice = 2 IoU / (1 + IoU) holds in each form.
The losses in seglab.losses minimise one minus these scores; this module only measures.
"""
from __future__ import annotations

import torch

from seglab.metrics._distributed import sum_over_processes
from seglab.metrics.confusion import TASKS, nan_divide, nanmean

__all__ = ["NORMS", "SoftOverlap", "overlap_terms", "soft_dice", "soft_iou"]

NORMS = ("l1", "l2")


def overlap_terms(
    probs: torch.Tensor, target: torch.Tensor, norm: str, dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """<Y,P>, |P| and |Y| (L1, or squared L2) summed over `dims`; inputs of equal shape."""
    if norm not in NORMS:
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    intersection = (probs * target).sum(dims)
    if norm == "l1":
        return intersection, probs.sum(dims), target.sum(dims)
    return intersection, (probs * probs).sum(dims), (target * target).sum(dims)


def _per_class_dims(probs: torch.Tensor, target: torch.Tensor) -> tuple[int, ...]:
    if probs.shape != target.shape:
        raise ValueError(f"probabilities {tuple(probs.shape)} and target {tuple(target.shape)} must have the same shape")
    return tuple(d for d in range(probs.dim()) if d != 1) if probs.dim() > 1 else (0,)


def soft_iou(probs: torch.Tensor, target: torch.Tensor, *, norm: str = "l1") -> torch.Tensor:
    """Per-class soft IoU of probabilities and (one-hot or soft) targets N x K x ...; NaN if 0/0."""
    intersection, p, y = overlap_terms(probs.double(), target.double(), norm, _per_class_dims(probs, target))
    return nan_divide(intersection, p + y - intersection)


def soft_dice(probs: torch.Tensor, target: torch.Tensor, *, norm: str = "l1") -> torch.Tensor:
    """Per-class soft Dice of probabilities and (one-hot or soft) targets N x K x ...; NaN if 0/0."""
    intersection, p, y = overlap_terms(probs.double(), target.double(), norm, _per_class_dims(probs, target))
    return nan_divide(2 * intersection, p + y)


class SoftOverlap:
    """Streaming soft IoU and soft Dice over a data set (sums of <Y,P>, |P|, |Y| per class).

    task="multiclass": pred N x K x H x W probabilities (or logits with from_logits=True,
    softmax over dim 1), target class indices N x H x W. task="binary": pred N x H x W or
    N x 1 x H x W foreground probabilities (sigmoid of logits with from_logits=True), target
    0/1; one class is reported (the foreground). task="multilabel": pred and target
    N x K x H x W. Pixels (or label entries) equal to `ignore_index` are not counted.

    compute() keys: soft_iou, soft_dice (float64 per class), msoft_iou, msoft_dice (macro,
    NaN-skipping), micro_soft_iou, micro_soft_dice (terms summed over classes first).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        norm: str = "l1",
        task: str = "multiclass",
        ignore_index: int | None = 255,
        from_logits: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.num_classes = 1 if task == "binary" else num_classes
        self.norm = norm
        self.task = task
        self.ignore_index = ignore_index
        self.from_logits = from_logits
        self.terms = torch.zeros(3, self.num_classes, dtype=torch.float64, device=device)

    def reset(self) -> None:
        self.terms.zero_()

    def _probabilities_and_targets(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probabilities, one-hot targets and a validity mask, all N x K x H x W."""
        if self.task == "multiclass":
            if pred.dim() != target.dim() + 1 or pred.shape[1] != self.num_classes:
                raise ValueError(f"multiclass soft metrics need pred N x {self.num_classes} x H x W and target N x H x W")
            probs = pred.softmax(1) if self.from_logits else pred
            valid = (target >= 0) & (target < self.num_classes)
            if self.ignore_index is not None:
                valid &= target != self.ignore_index
            onehot = torch.nn.functional.one_hot(target.masked_fill(~valid, 0).long(), self.num_classes)
            return probs, onehot.movedim(-1, 1).to(probs.dtype), valid.unsqueeze(1)
        if self.task == "binary":
            pred = pred[:, 0] if pred.dim() == target.dim() + 1 else pred
            target = target[:, 0] if target.dim() == pred.dim() + 1 else target
            pred, target = pred.unsqueeze(1), target.unsqueeze(1)
        probs = pred.sigmoid() if self.from_logits else pred
        if probs.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(probs.shape)} does not match target shape {tuple(target.shape)}")
        valid = (target == 0) | (target == 1)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        return probs, target.masked_fill(~valid, 0).to(probs.dtype), valid

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        device = self.terms.device
        probs, onehot, valid = self._probabilities_and_targets(pred.to(device), target.to(device))
        probs, onehot = probs.double() * valid, onehot.double() * valid
        dims = tuple(d for d in range(probs.dim()) if d != 1)
        self.terms += torch.stack(overlap_terms(probs, onehot, self.norm, dims))

    def compute(self) -> dict[str, torch.Tensor | float]:
        intersection, p, y = sum_over_processes(self.terms)
        iou = nan_divide(intersection, p + y - intersection)
        dice = nan_divide(2 * intersection, p + y)
        i, ps, ys = intersection.sum(), p.sum(), y.sum()
        return {
            "soft_iou": iou,
            "soft_dice": dice,
            "msoft_iou": nanmean(iou),
            "msoft_dice": nanmean(dice),
            "micro_soft_iou": float(nan_divide(i, ps + ys - i)),
            "micro_soft_dice": float(nan_divide(2 * i, ps + ys)),
        }
