"""class_indices: argmax's class map, by max's kernel."""
from __future__ import annotations

import pytest
import torch

from seglab.ops.class_map import class_indices


@pytest.mark.parametrize("shape, dim, channels_last", [((3, 6, 17, 23), 1, False), ((3, 6, 17, 23), 1, True),
                                                       ((2, 21, 8, 8), 1, True), ((6, 9, 11), -3, False), ((4, 5), 1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_indices_is_argmax(shape, dim, channels_last, dtype):
    scores = torch.randn(shape).to(dtype)
    if channels_last:
        scores = scores.contiguous(memory_format=torch.channels_last)
    indices = class_indices(scores, dim=dim)
    assert indices.dtype == torch.int64
    assert torch.equal(indices, scores.argmax(dim=dim))


def test_ties_go_to_the_first_class_and_nan_counts_as_largest_as_in_argmax():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0], [1.0, 3.0, float("nan"), 3.0], [0.5, 0.5, 0.5, 0.5]])[..., None, None]
    assert class_indices(scores).flatten().tolist() == [1, 2, 0]
    assert torch.equal(class_indices(scores), scores.argmax(dim=1))
