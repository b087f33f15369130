"""Instance targets: synthetic ids, instance-index folders, COCO JSON (polygons, RLE), augmentation,
and the COCO round trip (ground truth as predictions -> results JSON -> pycocotools AP 1.0)."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from seglab.data.coco import CocoInstances, CocoSemantic, coco_split_ids
from seglab.data.instance import (
    InstanceFolder,
    SyntheticInstances,
    instance_transforms,
    make_target,
    open_instance_dataset,
)
from seglab.metrics import coco_results, save_coco_results


def test_boxes_span_whole_pixels_and_empty_masks_are_dropped():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 2, 3] = True  # a single pixel
    masks[2, 1:4, 2:7] = True
    target = make_target(masks, torch.tensor([1, 2, 3]), image_id=7)
    assert target["boxes"].tolist() == [[3.0, 2.0, 4.0, 3.0], [2.0, 1.0, 7.0, 4.0]]
    assert target["labels"].tolist() == [1, 3]
    assert target["masks"].shape == (2, 6, 8) and target["image_id"] == 7


def test_synthetic_instances_follow_the_instance_map_and_semantic_classes():
    data = SyntheticInstances(num_samples=3, image_size=48, num_classes=4, seed=1)
    shapes = data.shapes[2]
    image, target = data[2]
    assert image.shape == (3, 48, 48)
    assert len(target["masks"]) == int(shapes["instances"].max())
    for mask, label in zip(target["masks"].bool(), target["labels"]):
        assert (shapes["mask"][mask] == label).all()
    union = target["masks"].bool().any(0)
    assert torch.equal(union, shapes["instances"] > 0)


def test_augmentation_keeps_boxes_tight_around_the_moved_masks():
    torch.manual_seed(0)
    data = SyntheticInstances(num_samples=4, image_size=64, num_classes=4, seed=2, transforms=instance_transforms(True, crop_size=40))
    for index in range(4):
        image, target = data[index]
        assert image.shape == (3, 40, 40)
        masks = target["masks"].bool()
        assert masks.flatten(1).any(1).all()  # objects cropped away are gone, with their labels
        assert len(target["labels"]) == len(target["boxes"]) == len(masks)
        for mask, box in zip(masks, target["boxes"].tolist()):
            rows, cols = torch.where(mask)
            assert box == [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


def test_instance_folder_reads_index_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    instances = np.zeros((20, 30), np.uint16)
    instances[2:6, 3:9] = 1
    instances[10:18, 20:28] = 300  # 16-bit ids are fine
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(instances).save(tmp_path / "masks" / "a.png")
    data = open_instance_dataset(str(tmp_path), "val")  # one folder: its first file is held out for val
    assert isinstance(data, InstanceFolder) and len(data) == 1
    image, target = data[0]
    assert image.shape == (3, 20, 30)
    assert target["boxes"].tolist() == [[3.0, 2.0, 9.0, 6.0], [20.0, 10.0, 28.0, 18.0]]
    assert target["labels"].tolist() == [1, 1]
    (tmp_path / "masks" / "a.png").rename(tmp_path / "masks" / "a_mask.png")  # named with a suffix, as the folder format reads
    assert InstanceFolder(tmp_path).pairs == [(tmp_path / "images" / "a.png", tmp_path / "masks" / "a_mask.png")]


def test_instance_folder_names_the_image_without_a_mask(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(FileNotFoundError, match="lonely.png"):
        InstanceFolder(tmp_path)


def _write_coco(tmp_path) -> tuple[str, np.ndarray]:
    """Two images; sparse category ids 3 and 7; a polygon, a compressed RLE, an uncompressed RLE, a crowd."""
    (tmp_path / "images").mkdir()
    height, width = 24, 32
    for name in ("first.png", "second.png"):
        Image.fromarray(np.full((height, width, 4), 200, np.uint8)).save(tmp_path / "images" / name)  # RGBA, as DSB2018
    blob = np.zeros((height, width), np.uint8)
    blob[12:20, 4:14] = 1
    compressed = mask_utils.encode(np.asfortranarray(blob))
    compressed["counts"] = compressed["counts"].decode("ascii")
    flat = blob.flatten(order="F")  # uncompressed RLE: run lengths, starting with zeros
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    crowd = np.zeros((height, width), np.uint8)
    crowd[0:4, 0:4] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode("ascii")
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 7, "segmentation": [[20, 2, 30, 2, 30, 10, 20, 10]], "iscrowd": 0, "area": 80, "bbox": [20, 2, 10, 8]},
        {"id": 2, "image_id": 10, "category_id": 3, "segmentation": compressed, "iscrowd": 0, "area": 80, "bbox": [4, 12, 10, 8]},
        {"id": 3, "image_id": 11, "category_id": 3, "segmentation": {"size": [height, width], "counts": counts}, "iscrowd": 0, "area": 80, "bbox": [4, 12, 10, 8]},
        {"id": 4, "image_id": 11, "category_id": 7, "segmentation": crowd_rle, "iscrowd": 1, "area": 16, "bbox": [0, 0, 4, 4]},
    ]
    document = {
        "images": [{"id": 10, "file_name": "first.png", "height": height, "width": width}, {"id": 11, "file_name": "second.png", "height": height, "width": width}],
        "categories": [{"id": 3, "name": "blob"}, {"id": 7, "name": "box"}],
        "annotations": annotations,
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(document))
    return str(path), blob


def test_coco_polygons_and_both_rle_forms_decode_to_instance_targets(tmp_path):
    path, blob = _write_coco(tmp_path)
    data = CocoInstances(path)
    assert data.classes == ("background", "blob", "box") and data.category_of_label == {1: 3, 2: 7}
    image, first = data[0]
    assert image.shape == (3, 24, 32) and first["image_id"] == 10
    assert first["labels"].tolist() == [2, 1]
    assert first["boxes"][0].tolist() == [20.0, 2.0, 30.0, 10.0]  # the polygon's pixels
    assert np.array_equal(first["masks"][1].numpy(), blob)  # compressed RLE
    _, second = data[1]
    assert second["labels"].tolist() == [1]  # the crowd region is not an instance
    assert np.array_equal(second["masks"][0].numpy(), blob)  # uncompressed RLE


def test_coco_semantic_view_marks_crowds_as_ignore(tmp_path):
    path, blob = _write_coco(tmp_path)
    data = CocoSemantic(path)
    assert data.num_classes == 3
    mask = data[1]["mask"]
    assert mask.dtype == torch.int64 and mask.shape == (24, 32)
    assert (mask[0:4, 0:4] == 255).all() and torch.equal(mask[torch.from_numpy(blob).bool()], torch.ones(80, dtype=torch.int64))


def test_a_fixed_split_is_disjoint_and_complete():
    ids = list(range(100, 0, -3))
    train, val = coco_split_ids(ids, "train", 5), coco_split_ids(ids, "val", 5)
    assert sorted(train + val) == sorted(ids) and not set(train) & set(val)
    assert len(val) == len(ids) // 5
    with pytest.raises(ValueError, match="split"):
        coco_split_ids(ids, "test", 5)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        CocoInstances(tmp_path / "nothing.json")


def test_ground_truth_as_predictions_round_trips_to_coco_ap_one(tmp_path):
    path, _ = _write_coco(tmp_path)
    data = CocoInstances(path)
    predictions, image_ids = [], []
    for index in range(len(data)):
        _, target = data[index]
        count = len(target["labels"])
        predictions.append(
            {"masks": target["masks"][:, None].float(), "labels": target["labels"], "scores": torch.ones(count), "boxes": target["boxes"]}
        )
        image_ids.append(target["image_id"])
    records = [{**r, "category_id": data.category_of_label[r["category_id"]]} for r in coco_results(predictions, image_ids)]
    results_file = save_coco_results(records, tmp_path / "results.json")
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(path)
        evaluation = COCOeval(truth, truth.loadRes(str(results_file)), iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
    assert evaluation.stats[1] == pytest.approx(1.0)  # AP50


def test_instance_augment_options_parse_and_refuse():
    import pytest

    from seglab.data.instance import instance_augment_options

    defaults = {"scale": (0.75, 1.25), "copy_paste": 0.0}
    assert instance_augment_options(None) == defaults and instance_augment_options(True) == defaults
    assert instance_augment_options(False) is None
    assert instance_augment_options({"copy_paste": 0.5}) == {**defaults, "copy_paste": 0.5}
    assert instance_augment_options({"scale": [0.5, 1.5], "copy_paste": 1}) == {"scale": (0.5, 1.5), "copy_paste": 1.0}
    for bad, message in [
        ({"hflip": 0.5}, "unknown augment option"),
        ({"scale": [1.5, 0.5]}, "'scale' must be"),
        ({"copy_paste": -0.1}, "'copy_paste' must be a probability"),
        ({"copy_paste": True}, "'copy_paste' must be a probability"),
        ("strong", "must be a mapping"),
    ]:
        with pytest.raises(ValueError, match=message):
            instance_augment_options(bad)


def test_one_instance_folder_is_split_as_the_semantic_folder_format_splits_and_names_its_classes(tmp_path):
    from seglab.data.folder import HOLDOUT_EVERY

    for sub in ("images", "masks", "classes"):
        (tmp_path / sub).mkdir()
    for index in range(12):
        instances = np.zeros((8, 8), np.uint8)
        instances[1:4, 1:4], instances[5:7, 5:7] = 1, 2
        Image.fromarray(np.full((8, 8, 3), index, np.uint8)).save(tmp_path / "images" / f"{index:02d}.png")
        Image.fromarray(instances).save(tmp_path / "masks" / f"{index:02d}.png")
        Image.fromarray(np.where(instances == 2, 2, np.where(instances == 1, 1, 0)).astype(np.uint8)).save(tmp_path / "classes" / f"{index:02d}.png")
    with pytest.raises(FileNotFoundError, match="no classes.yaml names the classes"):
        open_instance_dataset(str(tmp_path), "train")
    (tmp_path / "classes").rename(tmp_path / "elsewhere")
    (tmp_path / "classes.yaml").write_text("classes: [background, cat, dog]\n")
    with pytest.raises(FileNotFoundError, match="2 object classes but no .*classes folder of class maps"):
        open_instance_dataset(str(tmp_path), "train")  # rather than a missing file in the first epoch
    (tmp_path / "elsewhere").rename(tmp_path / "classes")
    (tmp_path / "classes.yaml").write_text("classes: [background, cat, dog]\n")
    train, val = (open_instance_dataset(str(tmp_path), split) for split in ("train", "val"))
    held_out = [f"{i:02d}.png" for i in range(0, 12, HOLDOUT_EVERY)]
    assert [p.name for p, _ in val.pairs] == held_out  # not the training images again
    assert sorted(p.name for p, _ in train.pairs) == sorted(f"{i:02d}.png" for i in range(12) if f"{i:02d}.png" not in held_out)
    assert train.classes == ("background", "cat", "dog")
    _, target = train[0]
    assert target["labels"].tolist() == [1, 2]  # read from classes/
