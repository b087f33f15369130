"""Class statistics of a data set, and class-balancing weights from them.

Median frequency balancing (Eigen & Fergus, ICCV 2015; used by SegNet, Badrinarayanan et al.,
TPAMI 2017, Sec. 4): the weight of class c is ``median_freq / freq(c)``, where ``freq(c)`` is
the number of pixels of class c divided by the total number of pixels in the images where c
is present, and the median runs over the classes that occur. Rare classes get weights above
1, frequent ones below.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from seglab.data.base import SegmentationDataset

__all__ = ["ClassCounts", "count_classes", "class_frequencies", "median_frequency_weights"]


@dataclass(frozen=True)
class ClassCounts:
    """Pixels per class, and pixels of the images in which each class occurs at all."""

    pixels: np.ndarray
    pixels_of_images_with_class: np.ndarray
    images_with_class: np.ndarray
    ignored: int
    images: int


def count_classes(dataset: SegmentationDataset) -> ClassCounts:
    """Count labels over every mask of ``dataset``, at native size and without augmentation.

    File-backed sets expose ``load_mask`` (no image decoding, no augmentation); any other
    data set is read through ``__getitem__``.
    """
    num_classes = dataset.num_classes
    if num_classes < 1:
        raise ValueError("the data set names no classes, so class frequencies are undefined")
    pixels = np.zeros(num_classes, np.int64)
    pixels_of_images = np.zeros(num_classes, np.int64)
    images_with = np.zeros(num_classes, np.int64)
    ignored = 0
    load_mask = getattr(dataset, "load_mask", None)
    for index in range(len(dataset)):
        mask = load_mask(index) if load_mask is not None else dataset[index]["mask"]
        labels = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        valid = (labels >= 0) & (labels < num_classes)
        counts = np.bincount(labels[valid].ravel(), minlength=num_classes)
        present = counts > 0
        pixels += counts
        pixels_of_images[present] += labels.size
        images_with[present] += 1
        ignored += int((~valid).sum())
    return ClassCounts(pixels, pixels_of_images, images_with, ignored, len(dataset))


def class_frequencies(dataset: SegmentationDataset) -> list[float]:
    """Each class's share of the labelled (not ignored) pixels."""
    pixels = count_classes(dataset).pixels
    total = pixels.sum()
    return (pixels / total).tolist() if total else [0.0] * len(pixels)


def median_frequency_weights(dataset: SegmentationDataset) -> list[float]:
    """Per-class loss weights by median frequency balancing (SegNet's class balancing).

    A class that never occurs gets weight 0: it contributes nothing to the loss anyway, and a
    finite value keeps the weight vector usable.
    """
    return median_frequency_weights_from_counts(count_classes(dataset))


def median_frequency_weights_from_counts(counts: ClassCounts) -> list[float]:
    occurs = counts.pixels > 0
    if not occurs.any():
        raise ValueError("no labelled pixel in the data set, so median frequency weights are undefined")
    frequency = np.zeros(len(counts.pixels), np.float64)
    frequency[occurs] = counts.pixels[occurs] / counts.pixels_of_images_with_class[occurs]
    median = float(np.median(frequency[occurs]))
    weights = np.zeros_like(frequency)
    weights[occurs] = median / frequency[occurs]
    return weights.tolist()
