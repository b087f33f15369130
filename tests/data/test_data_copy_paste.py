"""Copy-paste augmentation: pasted pixels and masks, occlusion of the objects underneath."""
from __future__ import annotations

import pytest
import torch

from seglab.data.copy_paste import CopyPaste, paste_objects
from seglab.data.instance import SyntheticInstances, instance_transforms, make_target


def _sample(size: int, boxes: list[tuple[int, int, int, int]], labels: list[int], value: float, image_id: int = 0):
    """An image filled with ``value`` and one rectangular object (rows y1:y2, cols x1:x2) per box."""
    masks = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        mask[y1:y2, x1:x2] = True
    return torch.full((3, size, size), value), make_target(masks, torch.tensor(labels), image_id)


def test_pasted_objects_cover_the_ones_below_and_hidden_ones_disappear() -> None:
    image, target = _sample(8, [(0, 0, 4, 4), (5, 5, 7, 7)], [1, 2], value=0.0, image_id=7)
    source_image, source_target = _sample(8, [(2, 2, 8, 8), (0, 6, 2, 8)], [3, 4], value=1.0)
    new_image, new_target = paste_objects(image, target, source_image, source_target, torch.tensor([True, False]))

    # the first object keeps its uncovered L shape, the second (inside the pasted one) is gone
    assert new_target["labels"].tolist() == [1, 3]
    assert new_target["masks"][0].sum() == 16 - 4
    assert new_target["boxes"].tolist() == [[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 8.0, 8.0]]
    assert new_target["image_id"] == 7
    # pixels: the source's where it pasted, the destination's elsewhere (the unchosen object is not pasted)
    assert new_image[:, 2:8, 2:8].eq(1.0).all()
    assert new_image[:, 6:8, 0:2].eq(0.0).all()
    assert new_image.sum() == 3 * 36
    assert int(new_target["masks"].sum(0).max()) == 1  # masks stay disjoint


def test_a_source_of_another_size_is_cut_or_padded_at_the_top_left() -> None:
    image, target = _sample(8, [(0, 0, 2, 2)], [1], value=0.0)
    large_image, large_target = _sample(12, [(6, 6, 12, 12), (10, 10, 12, 12)], [2, 3], value=1.0)
    _, pasted = paste_objects(image, target, large_image, large_target, torch.tensor([True, True]))
    assert pasted["labels"].tolist() == [1, 2]  # the second source object lies outside the 8 x 8 image
    assert pasted["boxes"][1].tolist() == [6.0, 6.0, 8.0, 8.0]

    small_image, small_target = _sample(4, [(1, 1, 3, 3)], [2], value=1.0)
    new_image, pasted = paste_objects(image, target, small_image, small_target, torch.tensor([True]))
    assert pasted["masks"].shape == (2, 8, 8)
    assert new_image[:, 4:, :].eq(0.0).all()


def test_copy_paste_adds_objects_and_keeps_the_data_set_interface() -> None:
    base = SyntheticInstances(num_samples=12, image_size=64, transforms=instance_transforms(True))
    torch.manual_seed(0)
    plain = sum(len(base[i][1]["labels"]) for i in range(12))
    wrapped = CopyPaste(base, probability=1.0)
    torch.manual_seed(0)
    samples = [wrapped[i] for i in range(12)]
    assert sum(len(t["labels"]) for _, t in samples) > plain
    for image, target in samples:
        assert image.shape == (3, 64, 64)
        assert len(target["labels"]) == len(target["boxes"]) == len(target["masks"])
        assert int(target["masks"].sum(0).max()) <= 1
    assert wrapped.classes == base.classes and wrapped.num_classes == base.num_classes and len(wrapped) == 12


def test_probability_zero_changes_nothing_and_out_of_range_is_refused() -> None:
    base = SyntheticInstances(num_samples=4, image_size=32)
    image, target = CopyPaste(base, probability=0.0)[2]
    expected_image, expected_target = base[2]
    assert torch.equal(image, expected_image) and torch.equal(target["masks"], expected_target["masks"])
    with pytest.raises(ValueError, match="between 0 and 1"):
        CopyPaste(base, probability=1.5)
