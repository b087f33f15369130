"""Object sizes of an instance data set, and the anchor scale that suits them.

A one-stage detector (YOLACT) learns classes, boxes and mask coefficients only at the anchors a
ground-truth box matches with IoU >= 0.5; an object between two anchor scales may match one
anchor (the one every object is granted), and then gets one sample of each loss per image. The
papers size anchors for COCO at 550-800 pixels; a data set of other object sizes (128-pixel
synthetic shapes 30-70 pixels wide, nuclei 7-30 pixels wide) needs its own scale. As
auto-anchor methods do (YOLOv2's k-means, YOLOv5's autoanchor), the scale comes from the
training boxes: the smallest anchor is a low percentile of the objects' sides, so even small
objects overlap an anchor of their size and larger ones the next levels (each level doubles).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ANCHOR_PERCENTILE", "anchor_size_for", "object_sides"]

# Measured on the synthetic shapes (docs/instance.md): YOLACT's mask AP50 after 4 epochs was
# 0.27 / 0.33 / 0.35 with P3 anchors of 21 / 32 / 40 pixels (the 2nd / 10th / 28th percentile of
# the augmented training boxes' sides; lr 8e-4), and 0.39 / 0.40 with 40 / 48 (28th / 56th; lr
# 1.6e-3): the gain levels off above the first quartile.
ANCHOR_PERCENTILE = 25.0


def object_sides(dataset: torch.utils.data.Dataset, limit: int = 128, enough: int = 512) -> np.ndarray:
    """sqrt(width x height) of the boxes in the first samples, as training sees them: up to
    ``limit`` samples, fewer once ``enough`` boxes are in (crowded images such as nuclei).

    Samples are read through the data set's own transforms (crops and scale jitter change the
    sizes the model is trained on) with torch's random state saved and restored, so reading
    them leaves the training run's random stream as it was.
    """
    sides: list[torch.Tensor] = []
    count = 0
    with torch.random.fork_rng(devices=[]):
        for index in range(min(limit, len(dataset))):
            boxes = dataset[index][1]["boxes"].as_subclass(torch.Tensor).float()
            sides.append(((boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(1)).sqrt())
            count += len(boxes)
            if count >= enough:
                break
    return torch.cat(sides).numpy() if sides else np.zeros(0, np.float32)


def anchor_size_for(sides: Sequence[float] | np.ndarray, percentile: float = ANCHOR_PERCENTILE, minimum: int = 8) -> int | None:
    """The smallest anchor's side for these object sides (``None`` when there are no objects)."""
    sides = np.asarray(sides, dtype=np.float64)
    sides = sides[sides > 0]
    if sides.size == 0:
        return None
    return max(minimum, int(round(float(np.percentile(sides, percentile)))))
