"""Class frequencies and SegNet's median frequency balancing, checked by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seglab.data.base import SegmentationDataset
from seglab.data.stats import class_frequencies, count_classes, median_frequency_weights


class _Masks(SegmentationDataset):
    def __init__(self, masks, num_classes):
        self.masks = [torch.tensor(m) for m in masks]
        self.classes = tuple(f"c{k}" for k in range(num_classes))

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, index):
        return {"image": torch.zeros(3, *self.masks[index].shape), "mask": self.masks[index]}


def test_median_frequency_by_hand():
    # image 1: 3 px of class 0, 1 px of class 1; image 2: 2 px class 0, 1 px class 2, 1 px ignore
    dataset = _Masks([[[0, 0, 0, 1]], [[0, 0, 2, 255]]], num_classes=4)
    counts = count_classes(dataset)
    assert counts.pixels.tolist() == [5, 1, 1, 0] and counts.ignored == 1
    # freq = pixels / pixels of the images containing the class: 5/8, 1/4, 1/4; median 1/4
    frequency = np.array([5 / 8, 1 / 4, 1 / 4])
    expected = np.median(frequency) / frequency
    assert median_frequency_weights(dataset) == pytest.approx(expected.tolist() + [0.0])
    assert class_frequencies(dataset) == pytest.approx([5 / 7, 1 / 7, 1 / 7, 0.0])


def test_rare_classes_weigh_more_and_empty_sets_are_refused():
    weights = median_frequency_weights(_Masks([[[0] * 9 + [1]], [[0] * 8 + [2, 2]]], num_classes=3))
    assert weights[1] > weights[2] > weights[0] and weights[2] == pytest.approx(1.0)  # class 2 holds the median
    with pytest.raises(ValueError, match="no labelled pixel"):
        median_frequency_weights(_Masks([[[255, 255]]], num_classes=2))
