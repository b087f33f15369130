"""Confusion-matrix metrics for semantic segmentation, streamed over batches.

All figures derive from pixel counts: for multiclass (and binary, its two-class case) one
K x K matrix `M[t, p]` = number of pixels of true class t predicted as p; for multilabel one
2 x 2 matrix per label, `M[c, t, p]`. With TP, FP, FN per class (Long et al. 2015, sec. 5;
Everingham et al. 2015 for the Pascal VOC IoU):

    pixel accuracy   sum_c TP_c / N                (multilabel: (TP + TN) / label-pixels)
    accuracy_c       TP_c / (TP_c + FN_c)          (= recall_c; mean_accuracy is their mean)
    precision_c      TP_c / (TP_c + FP_c)
    IoU_c            TP_c / (TP_c + FP_c + FN_c)   (Jaccard)
    Dice_c           2 TP_c / (2 TP_c + FP_c + FN_c)  (F1; Dice = 2 IoU / (1 + IoU))
    fwIoU            sum_c (support_c / N) IoU_c
    micro means      the same ratios of TP, FP, FN summed over classes first.

NaN convention: a ratio whose denominator is zero is NaN. For IoU and Dice that happens exactly
when a class is absent from both prediction and target; such a class is reported as NaN and
left out of every macro mean, so a class that never occurs in a validation split neither
rewards nor punishes the model. Pixels whose target equals `ignore_index` (or lies outside
0..K-1) are not counted at all.
"""
from __future__ import annotations

import torch

from seglab.metrics._distributed import sum_over_processes
from seglab.ops.class_map import class_indices

__all__ = ["ConfusionMatrix", "nan_divide", "nanmean", "scores_from_counts"]

TASKS = ("multiclass", "binary", "multilabel")


def nan_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, NaN where the denominator is zero (0/0 is undefined, not 0)."""
    ratio = numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, ratio, torch.full_like(ratio, float("nan")))


def nanmean(values: torch.Tensor) -> float:
    """Mean of the non-NaN entries; NaN when every entry is NaN."""
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else float("nan")


def scores_from_counts(
    true_positive: torch.Tensor, false_positive: torch.Tensor, false_negative: torch.Tensor
) -> dict[str, torch.Tensor | float]:
    """Per-class and mean figures from per-class TP, FP, FN counts (float64 tensors)."""
    support = true_positive + false_negative
    predicted = true_positive + false_positive
    union = true_positive + false_positive + false_negative
    iou = nan_divide(true_positive, union)
    dice = nan_divide(2 * true_positive, support + predicted)
    recall = nan_divide(true_positive, support)
    precision = nan_divide(true_positive, predicted)
    present = ~torch.isnan(iou)
    total_support = support.sum()
    fwiou = float((support[present] * iou[present]).sum() / total_support) if total_support > 0 else float("nan")
    tp, fp, fn = true_positive.sum(), false_positive.sum(), false_negative.sum()
    return {
        "mean_accuracy": nanmean(recall),
        "mean_precision": nanmean(precision),
        "miou": nanmean(iou),
        "mdice": nanmean(dice),
        "fwiou": fwiou,
        "micro_iou": float(nan_divide(tp, tp + fp + fn)),
        "micro_dice": float(nan_divide(2 * tp, 2 * tp + fp + fn)),
        "micro_precision": float(nan_divide(tp, tp + fp)),
        "micro_recall": float(nan_divide(tp, tp + fn)),
        "iou": iou,
        "dice": dice,
        "accuracy": recall,
        "precision": precision,
        "recall": recall,
        "support": support,
    }


class ConfusionMatrix:
    """Streaming confusion matrix and every figure derived from it.

    task="multiclass" (default): `update(pred, target)` takes class indices N x H x W or scores
    N x K x H x W (logits or probabilities; argmax over dim 1) and integer targets N x H x W.
    task="binary": pred N x H x W or N x 1 x H x W, either 0/1 (bool or integer) or floats
    thresholded at `threshold` (0.5 for probabilities; pass 0.0 for logits); targets 0/1.
    Reported as the two classes background (0) and foreground (1).
    task="multilabel": pred and target N x K x H x W, one independent 0/1 decision per label,
    floats thresholded as in the binary case; `ignore_index` may mark single label entries.

    compute() keys: pixel_accuracy, mean_accuracy, mean_precision, miou, mdice, fwiou, micro_iou, micro_dice,
    micro_precision, micro_recall (floats); iou, dice, accuracy, precision, recall, support
    (float64 per class); confusion_matrix (int64: K x K, or K x 2 x 2 for multilabel).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        device: torch.device | str = "cpu",
        *,
        task: str = "multiclass",
        threshold: float = 0.5,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if task == "binary":
            if num_classes not in (1, 2):
                raise ValueError(f"a binary confusion matrix has num_classes 1 or 2, got {num_classes}")
            num_classes = 2
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.task = task
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.threshold = threshold
        shape = (num_classes, 2, 2) if task == "multilabel" else (num_classes, num_classes)
        self.matrix = torch.zeros(shape, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if self.task == "multilabel":
            self._update_multilabel(pred, target)
            return
        if self.task == "binary":
            pred, target = self._binary_inputs(pred, target)
        elif pred.dim() == target.dim() + 1:
            pred = class_indices(pred, dim=1)
        elif pred.is_floating_point():
            raise ValueError("multiclass predictions must be class indices N x H x W or scores N x K x H x W")
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        k = self.num_classes
        device = self.matrix.device
        pred = pred.reshape(-1).to(device, torch.int64)
        target = target.reshape(-1).to(device, torch.int64)
        valid = (target >= 0) & (target < k)
        if self.ignore_index is not None and 0 <= self.ignore_index < k:
            valid &= target != self.ignore_index
        if pred.numel():
            low, high = torch.aminmax(pred)  # cheap check first; the exact one only if it fails
            if (low < 0 or high >= k) and bool((valid & ((pred < 0) | (pred >= k))).any()):
                raise ValueError(f"predicted class outside 0..{k - 1}")
        # Uncounted pixels go to one extra bin that is dropped: cheaper than boolean indexing.
        flat = torch.where(valid, target * k + pred, k * k)
        counts = torch.bincount(flat, minlength=k * k + 1)[: k * k]
        self.matrix += counts.reshape(k, k)

    def _binary_inputs(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pred.dim() == target.dim() + 1 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if target.dim() == pred.dim() + 1 and target.shape[1] == 1:
            target = target[:, 0]
        if pred.is_floating_point():
            pred = pred > self.threshold
        return pred, target

    def _update_multilabel(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape or pred.dim() < 2 or pred.shape[1] != self.num_classes:
            raise ValueError(
                f"multilabel prediction {tuple(pred.shape)} and target {tuple(target.shape)} must both be N x {self.num_classes} x H x W"
            )
        if pred.is_floating_point():
            pred = pred > self.threshold
        device = self.matrix.device
        labels = torch.arange(self.num_classes, device=device).view(1, -1, *([1] * (pred.dim() - 2)))
        pred = pred.to(device, torch.int64)
        target = target.to(device, torch.int64)
        valid = (target == 0) | (target == 1)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        if bool((valid & ((pred < 0) | (pred > 1))).any()):
            raise ValueError("multilabel predictions must be 0/1 (or probabilities to threshold)")
        flat = torch.where(valid, labels * 4 + target * 2 + pred, 4 * self.num_classes)
        counts = torch.bincount(flat.reshape(-1), minlength=4 * self.num_classes + 1)[:-1]
        self.matrix += counts.reshape(self.num_classes, 2, 2)

    def compute(self) -> dict[str, torch.Tensor | float]:
        """Per-class and mean figures as a dict (per-class values are float64 tensors)."""
        m = sum_over_processes(self.matrix).double()
        if self.task == "multilabel":
            tp, fp, fn, tn = m[:, 1, 1], m[:, 0, 1], m[:, 1, 0], m[:, 0, 0]
            correct, total = (tp + tn).sum(), m.sum()
        else:
            tp = m.diag()
            fp, fn = m.sum(dim=0) - tp, m.sum(dim=1) - tp
            correct, total = tp.sum(), m.sum()
        results = {"pixel_accuracy": float(nan_divide(correct, total))}
        results.update(scores_from_counts(tp, fp, fn))
        results["confusion_matrix"] = m.long()
        return results
