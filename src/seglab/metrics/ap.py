"""Precision-recall curves and Average Precision for probabilistic (per-pixel) masks.

Every pixel is a detection with a score (its foreground probability) and a label (0/1). Sorting
by decreasing score, each distinct score s is a threshold: precision(s) = TP(s) / (TP(s) + FP(s)),
recall(s) = TP(s) / P, counting the pixels scored >= s. Average Precision is the step-wise area
under that curve without interpolation,

    AP = sum_n (R_n - R_{n-1}) P_n,     R_0 = 0,

the definition of scikit-learn and torchmetrics (not the 11-point or COCO 101-point
interpolated forms; COCO mask AP for instances lives in seglab.metrics.coco). mAP is the mean
over classes (one-vs-rest) that have at least one positive pixel; others are NaN.
"""
from __future__ import annotations

import torch

from seglab.metrics._distributed import gather_objects, sum_over_processes
from seglab.metrics.confusion import TASKS, nan_divide, nanmean

__all__ = ["AveragePrecision", "average_precision", "precision_recall_curve"]


def _valid_pairs(scores: torch.Tensor, target: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.shape != target.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and target {tuple(target.shape)} must have the same shape")
    scores, target = scores.reshape(-1), target.reshape(-1)
    valid = (target == 0) | (target == 1)
    if ignore_index is not None:
        valid &= target != ignore_index
    return scores[valid].double(), target[valid].bool()


def precision_recall_curve(
    scores: torch.Tensor, target: torch.Tensor, *, ignore_index: int | None = 255
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact binary PR curve: (precision, recall, thresholds), thresholds decreasing.

    scores: probabilities (any shape); target: 0/1 of the same shape, `ignore_index` skipped.
    Recall is NaN throughout when there is no positive pixel.
    """
    scores, target = _valid_pairs(scores, target, ignore_index)
    order = torch.argsort(scores, descending=True, stable=True)
    scores, target = scores[order], target[order]
    if scores.numel() == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty, empty
    # The last pixel of each run of equal scores closes one threshold.
    last_of_run = torch.cat([torch.nonzero(scores[1:] != scores[:-1]).flatten(), torch.tensor([scores.numel() - 1])])
    true_positive = target.cumsum(0)[last_of_run].double()
    detected = (last_of_run + 1).double()
    precision = true_positive / detected
    recall = nan_divide(true_positive, true_positive.new_tensor(float(target.sum())).expand_as(true_positive))
    return precision, recall, scores[last_of_run]


def _step_area(precision: torch.Tensor, recall: torch.Tensor) -> float:
    if recall.numel() == 0 or torch.isnan(recall).any():
        return float("nan")
    previous = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - previous) * precision).sum())


def average_precision(scores: torch.Tensor, target: torch.Tensor, *, ignore_index: int | None = 255) -> float:
    """Binary AP = sum_n (R_n - R_{n-1}) P_n over the exact PR curve; NaN without positives."""
    precision, recall, _ = precision_recall_curve(scores, target, ignore_index=ignore_index)
    return _step_area(precision, recall)


class AveragePrecision:
    """Streaming AP per class and mAP for probabilistic segmentation masks.

    task="binary": scores N x H x W (or N x 1 x H x W) and 0/1 targets; task="multiclass":
    probabilities N x K x H x W and class indices N x H x W, one-vs-rest per class;
    task="multilabel": scores and 0/1 targets N x K x H x W.

    thresholds=None keeps every score and gives the exact curve (memory grows with the data);
    thresholds=T uses T evenly spaced thresholds in [0, 1] and constant memory (a histogram per
    class), counting a pixel as detected at threshold t when its score is >= t, like
    torchmetrics' binned mode. compute() keys: ap (float64 per class), map.
    """

    def __init__(
        self,
        num_classes: int = 1,
        *,
        task: str = "binary",
        thresholds: int | None = None,
        ignore_index: int | None = 255,
        device: torch.device | str = "cpu",
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if thresholds is not None and thresholds < 2:
            raise ValueError(f"thresholds must be None or at least 2, got {thresholds}")
        self.task = task
        self.num_classes = 1 if task == "binary" else num_classes
        self.thresholds = thresholds
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        if self.thresholds is not None:
            # float32 like the scores, so a score equal to a threshold is detected at it.
            self.grid = torch.linspace(0, 1, self.thresholds, dtype=torch.float32, device=self.device)
            # histogram[c, 0, j]: negatives whose highest passed threshold is grid[j]; [c, 1, j]: positives.
            self.histogram = torch.zeros(self.num_classes, 2, self.thresholds, dtype=torch.int64, device=self.device)

    def _per_class(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and targets as K x M (one row per class), ignored pixels given target -1."""
        if self.task == "binary":
            pred = pred[:, 0] if pred.dim() == target.dim() + 1 else pred
            target = target[:, 0] if target.dim() == pred.dim() + 1 else target
            pred, target = pred.unsqueeze(1), target.unsqueeze(1)
        elif self.task == "multiclass":
            if pred.dim() != target.dim() + 1 or pred.shape[1] != self.num_classes:
                raise ValueError(f"multiclass AP needs probabilities N x {self.num_classes} x H x W and targets N x H x W")
            valid = (target >= 0) & (target < self.num_classes)
            if self.ignore_index is not None:
                valid &= target != self.ignore_index
            classes = torch.arange(self.num_classes, device=target.device).view(1, -1, *([1] * (target.dim() - 1)))
            target = torch.where(valid.unsqueeze(1), (target.unsqueeze(1) == classes).long(), -1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        target = target.long()
        keep = (target == 0) | (target == 1)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        target = torch.where(keep, target, -1)
        return pred.transpose(0, 1).reshape(self.num_classes, -1), target.transpose(0, 1).reshape(self.num_classes, -1)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        scores, labels = self._per_class(pred.to(self.device), target.to(self.device))
        if self.thresholds is None:
            self._scores.append(scores.float())
            self._targets.append(labels.to(torch.int8))
            return
        bins = torch.bucketize(scores.float().clamp(0, 1), self.grid, right=True) - 1
        k, t = self.num_classes, self.thresholds
        flat = torch.arange(k, device=self.device).view(-1, 1) * 2 * t + labels.clamp(min=0) * t + bins
        flat = torch.where(labels >= 0, flat, 2 * k * t)
        self.histogram += torch.bincount(flat.reshape(-1), minlength=2 * k * t + 1)[:-1].view(k, 2, t)

    def compute(self) -> dict[str, torch.Tensor | float]:
        if self.thresholds is None:
            ap = self._exact()
        else:
            ap = self._binned()
        return {"ap": ap, "map": nanmean(ap)}

    def _exact(self) -> torch.Tensor:
        scores = gather_objects([torch.cat(self._scores, 1).cpu()] if self._scores else [])
        targets = gather_objects([torch.cat(self._targets, 1).cpu()] if self._targets else [])
        if not scores:
            return torch.full((self.num_classes,), float("nan"), dtype=torch.float64)
        scores, targets = torch.cat(scores, 1), torch.cat(targets, 1)
        return torch.tensor(
            [average_precision(scores[c], targets[c], ignore_index=-1) for c in range(self.num_classes)], dtype=torch.float64
        )

    def _binned(self) -> torch.Tensor:
        histogram = sum_over_processes(self.histogram).double()
        # Pixels detected at threshold j are those whose bin is >= j: a reversed cumulative sum.
        detected = histogram.flip(-1).cumsum(-1).flip(-1)
        false_positive, true_positive = detected[:, 0], detected[:, 1]
        positives = histogram[:, 1].sum(-1, keepdim=True)
        recall = nan_divide(true_positive, positives.expand_as(true_positive))
        # With nothing detected precision is 1, as torchmetrics and scikit-learn take it.
        precision = torch.where(
            true_positive + false_positive > 0, true_positive / (true_positive + false_positive).clamp(min=1), 1.0
        )
        # Walk thresholds from high to low so recall increases.
        return torch.tensor(
            [_step_area(precision[c].flip(0), recall[c].flip(0)) for c in range(self.num_classes)], dtype=torch.float64
        )
