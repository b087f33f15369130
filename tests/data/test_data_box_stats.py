"""Object sizes of instance data and the anchor scale derived from them."""
from __future__ import annotations

import numpy as np
import torch

from seglab.data.box_stats import anchor_size_for, object_sides
from seglab.data.instance import make_target


class _Boxes(torch.utils.data.Dataset):
    """Samples with one square object each, of the given sides; draws torch randomness when read."""

    def __init__(self, sides: list[int]) -> None:
        self.sides = sides

    def __len__(self) -> int:
        return len(self.sides)

    def __getitem__(self, index: int):
        torch.rand(1)  # as random augmentations do
        masks = torch.zeros(1, 64, 64, dtype=torch.bool)
        masks[0, : self.sides[index], : self.sides[index]] = True
        return torch.zeros(3, 64, 64), make_target(masks, torch.ones(1, dtype=torch.int64), index)


def test_object_sides_reads_boxes_and_leaves_the_random_stream_alone() -> None:
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    sides = object_sides(_Boxes([4, 10, 30, 50]), limit=3)
    np.testing.assert_allclose(sides, [4, 10, 30])  # the first `limit` samples only
    assert torch.equal(torch.rand(1), expected_next)
    np.testing.assert_allclose(object_sides(_Boxes([4, 10, 30, 50]), enough=2), [4, 10])  # enough boxes


def test_anchor_size_is_a_low_percentile_of_the_sides() -> None:
    sides = np.arange(1, 101, dtype=float)  # 1..100
    assert anchor_size_for(sides, percentile=25) == 26  # numpy's linear interpolation: 25.75
    assert anchor_size_for(sides, percentile=50) == 50
    assert anchor_size_for([2.0, 3.0, 4.0]) == 8  # never below the minimum
    assert anchor_size_for([2.0, 3.0, 4.0], percentile=50, minimum=1) == 3
    assert anchor_size_for([]) is None and anchor_size_for([0.0]) is None
