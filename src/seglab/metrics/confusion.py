"""Confusion-matrix metrics for semantic segmentation, streamed over batches.

All figures derive from one K x K matrix `M[t, p]` = number of pixels of true class t
predicted as p. Pixels whose target equals `ignore_index` are not counted.

NaN convention: a class absent from both prediction and target has IoU = 0/0; it is reported
as NaN and left out of every mean, so that a class that never occurs in a validation split
neither rewards nor punishes the model.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Streaming K-class confusion matrix.

    `update(pred, target)` accepts predictions as class indices (N x H x W) or as scores
    (N x K x H x W, logits or probabilities; argmax over dim 1) and integer targets N x H x W.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be positive")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        pred = pred.reshape(-1).to(self.matrix.device, torch.int64)
        target = target.reshape(-1).to(self.matrix.device, torch.int64)
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        bad = keep & ((pred < 0) | (pred >= self.num_classes))
        if bool(bad.any()):
            raise ValueError(f"predicted class outside 0..{self.num_classes - 1}")
        flat = target[keep] * self.num_classes + pred[keep]
        self.matrix += torch.bincount(flat, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def _reduced(self) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized():
            matrix = self.matrix.clone()
            dist.all_reduce(matrix)
            return matrix
        return self.matrix

    def compute(self) -> dict[str, torch.Tensor | float]:
        """Per-class and mean figures as a dict (per-class values are float64 tensors)."""
        m = self._reduced().double()
        true_positive = m.diag()
        support = m.sum(dim=1)  # pixels of each true class
        predicted = m.sum(dim=0)  # pixels predicted as each class
        union = support + predicted - true_positive
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), nan)
        dice = torch.where(union > 0, 2 * true_positive / (support + predicted).clamp(min=1), nan)
        class_accuracy = torch.where(support > 0, true_positive / support.clamp(min=1), nan)
        precision = torch.where(predicted > 0, true_positive / predicted.clamp(min=1), nan)
        total = m.sum()
        frequency = support / total.clamp(min=1)
        present = ~torch.isnan(iou)
        return {
            "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else float("nan"),
            "mean_accuracy": _nanmean(class_accuracy),
            "miou": _nanmean(iou),
            "mdice": _nanmean(dice),
            "fwiou": float((frequency[present] * iou[present]).sum()) if total > 0 else float("nan"),
            "iou": iou,
            "dice": dice,
            "accuracy": class_accuracy,
            "precision": precision,
            "recall": class_accuracy,
            "confusion_matrix": m.long(),
        }


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else float("nan")
