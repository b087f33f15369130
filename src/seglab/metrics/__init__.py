"""Segmentation metrics, streaming (`update`, `compute`, `reset`) and usable on their own.

Every metric sums its state over processes when torch.distributed is initialised. NaN marks a
figure whose denominator is zero (a class absent from both prediction and target); NaNs are
left out of every mean. See docs/metrics.md.
"""
from seglab.metrics.ap import (
    AveragePrecision,
    average_precision,
    precision_recall_curve,
)
from seglab.metrics.boundary import (
    BoundaryIoU,
    TrimapIoU,
    boundary_iou,
    mask_to_boundary,
)
from seglab.metrics.coco import COCOMaskEvaluator, coco_results, save_coco_results
from seglab.metrics.confusion import ConfusionMatrix
from seglab.metrics.keypoints import COCOKeypointEvaluator, keypoint_results
from seglab.metrics.report import format_report, results_to_json
from seglab.metrics.soft import SoftOverlap, soft_dice, soft_iou

__all__ = [
    "AveragePrecision",
    "BoundaryIoU",
    "COCOKeypointEvaluator",
    "COCOMaskEvaluator",
    "ConfusionMatrix",
    "SoftOverlap",
    "TrimapIoU",
    "average_precision",
    "boundary_iou",
    "coco_results",
    "format_report",
    "keypoint_results",
    "mask_to_boundary",
    "precision_recall_curve",
    "results_to_json",
    "save_coco_results",
    "soft_dice",
    "soft_iou",
]
