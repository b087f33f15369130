import numpy as np
import pytest
import torch

from seglab.data import SyntheticShapes, open_dataset


def test_same_seed_same_samples_and_splits_differ():
    first = SyntheticShapes(4, 48, seed=3)
    again = SyntheticShapes(4, 48, seed=3)
    for index in range(4):
        assert torch.equal(first[index]["image"], again[index]["image"])
        assert torch.equal(first[index]["mask"], again[index]["mask"])
    val = SyntheticShapes(4, 48, seed=3, split="val")
    assert not torch.equal(first[0]["image"], val[0]["image"])
    other_seed = SyntheticShapes(4, 48, seed=4)
    assert not torch.equal(first[0]["image"], other_seed[0]["image"])


def test_sample_types_shapes_and_ranges():
    dataset = SyntheticShapes(8, (40, 56), num_classes=4)
    sample = dataset[0]
    assert sample["image"].shape == (3, 40, 56) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (40, 56) and sample["mask"].dtype == torch.int64
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    labels = torch.cat([dataset[i]["mask"].flatten() for i in range(8)])
    assert int(labels.max()) < 4 and int(labels.min()) >= 0
    assert dataset.num_classes == 4 and dataset.classes[0] == "background"
    assert len(dataset.palette) == 4


def test_instances_agree_with_semantic_mask():
    dataset = SyntheticShapes(16, 64, max_objects=5)
    for index in range(16):
        sample = dataset[index]
        mask, instances = sample["mask"], sample["instances"]
        # background in one map is background in the other
        assert torch.equal(mask == 0, instances == 0)
        ids = instances.unique()
        ids = ids[ids > 0]
        # ids are consecutive 1..n and each instance has exactly one class
        assert ids.tolist() == list(range(1, len(ids) + 1))
        for instance_id in ids:
            assert mask[instances == instance_id].unique().numel() == 1


def test_all_shape_classes_occur_and_overlap_happens():
    dataset = SyntheticShapes(64, 64, max_objects=5)
    seen = torch.zeros(6, dtype=torch.bool)
    overlapping = 0
    for index in range(64):
        sample = dataset[index]
        seen[sample["mask"].unique()] = True
        # an occluded instance shows as fewer visible instances than drawn objects is hard to see
        # directly; count images where two instances touch (4-neighbourhood), which needs overlap or contact
        instances = sample["instances"].numpy()
        horizontal = (instances[:, 1:] != instances[:, :-1]) & (instances[:, 1:] > 0) & (instances[:, :-1] > 0)
        overlapping += bool(horizontal.any())
    assert bool(seen.all())
    assert overlapping > 0


@pytest.mark.parametrize("options", [{"num_classes": 1}, {"num_classes": 7}, {"split": "dev"}, {"num_samples": 0}])
def test_bad_options_raise_clear_errors(options):
    with pytest.raises(ValueError):
        SyntheticShapes(**{"num_samples": 2, **options})


def test_open_dataset_synthetic_and_unknown_source():
    dataset = open_dataset("synthetic", "val", num_samples=3, image_size=32)
    assert len(dataset) == 3 and dataset[2]["image"].shape == (3, 32, 32)
    with pytest.raises((ValueError, FileNotFoundError)):
        open_dataset("/definitely/not/here", "train")


def test_background_is_textured_not_flat():
    image = SyntheticShapes(1, 64)[0]["image"].numpy()
    assert np.std(image[:, :8, :8]) > 0.01
