"""VOC, CamVid, Cityscapes, ADE20K and COCO layouts, format detection, and open_dataset's errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from seglab.data import (
    ADE20K,
    CamVid,
    Cityscapes,
    SyntheticShapes,
    VOCSegmentation,
    detect_format,
    open_dataset,
)
from seglab.data.cityscapes import LABEL_TO_TRAIN_ID
from seglab.data.files import equal_size_batches


def test_voc_reads_palette_masks_and_split_lists(tmp_path, helpers, rng):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for stem in ("2007_000032", "2007_000039"):
        image, labels = helpers.pair(rng, values=(0, 15, 20, 255))
        helpers.rgb(voc / "JPEGImages" / f"{stem}.jpg", image)
        helpers.index(voc / "SegmentationClass" / f"{stem}.png", labels, palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000039\n2007_000099\n")
    assert detect_format(tmp_path) == "voc"
    dataset = open_dataset(tmp_path, "val")
    assert isinstance(dataset, VOCSegmentation) and dataset.num_classes == 21 and len(dataset) == 1
    assert "2007_000099" in dataset.unpaired[0][1]
    assert set(dataset[0]["mask"].unique().tolist()) <= {0, 15, 20, 255}
    with pytest.raises(FileNotFoundError, match="train.txt"):
        VOCSegmentation(tmp_path, "train")


def _camvid(root, helpers, rng, split="train", stems=("0001TP_006690", "0001TP_006720")):
    lines = []
    for stem in stems:
        image, labels = helpers.pair(rng, values=(0, 3, 10, 11))
        helpers.rgb(root / split / f"{stem}.png", image)
        helpers.index(root / f"{split}annot" / f"{stem}.png", labels)
        lines.append(f"/SegNet/CamVid/{split}/{stem}.png /SegNet/CamVid/{split}annot/{stem}.png")
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return labels


def test_camvid_reroots_the_segnet_lists_and_ignores_unlabelled(tmp_path, helpers, rng):
    labels = _camvid(tmp_path, helpers, rng)
    assert detect_format(tmp_path) == "camvid"
    dataset = open_dataset(tmp_path, "train", augment=False)
    assert isinstance(dataset, CamVid) and dataset.num_classes == 11 and len(dataset) == 2
    assert dataset.pairs[1][0] == tmp_path / "train" / "0001TP_006720.png"
    mask = dataset[1]["mask"]
    assert torch.equal(mask, torch.from_numpy(np.where(labels == 11, 255, labels)))
    assert dataset.classes[0] == "Sky" and dataset.palette[3] == (128, 64, 128)


def test_camvid_lists_with_missing_files_are_recorded(tmp_path, helpers, rng):
    _camvid(tmp_path, helpers, rng)
    (tmp_path / "trainannot" / "0001TP_006690.png").unlink()
    dataset = CamVid(tmp_path, "train")
    assert len(dataset) == 1 and dataset.unpaired[0][0].name == "0001TP_006690.png"
    with pytest.raises(FileNotFoundError, match="'val'"):
        CamVid(tmp_path, "val")


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path, helpers, rng):
    label_ids = np.array([[7, 8, 26, 33], [0, 1, 9, 24]] * 3)
    helpers.rgb(tmp_path / "leftImg8bit" / "val" / "aachen" / "aachen_000000_000019_leftImg8bit.png", rng.integers(0, 256, size=(6, 4, 3)))
    helpers.index(tmp_path / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", label_ids)
    assert detect_format(tmp_path) == "cityscapes"
    dataset = open_dataset(tmp_path, "val")
    assert isinstance(dataset, Cityscapes) and dataset.num_classes == 19
    assert dataset[0]["mask"][:2].tolist() == [[0, 1, 13, 18], [255, 255, 255, 11]]
    assert sorted(LABEL_TO_TRAIN_ID.values()) == list(range(19))


def test_ade20k_reduces_the_zero_label(tmp_path, helpers, rng):
    ade = tmp_path / "ADEChallengeData2016"
    labels = np.array([[0, 1, 150, 7]] * 5)
    helpers.rgb(ade / "images" / "validation" / "ADE_val_00000001.jpg", rng.integers(0, 256, size=(5, 4, 3)))
    helpers.index(ade / "annotations" / "validation" / "ADE_val_00000001.png", labels)
    assert detect_format(tmp_path) == "ade20k"
    dataset = open_dataset(tmp_path, "val")
    assert isinstance(dataset, ADE20K) and dataset.num_classes == 150 and dataset.classes[0] == "wall"
    assert dataset[0]["mask"][0].tolist() == [255, 0, 149, 6]
    full = ADE20K(tmp_path, "val", reduce_zero_label=False)
    assert full.num_classes == 151 and full.load_mask(0)[0].tolist() == [0, 1, 150, 7]


def test_coco_json_becomes_semantic_masks(tmp_path, helpers, rng):
    helpers.rgb(tmp_path / "images" / "a.png", rng.integers(0, 256, size=(10, 10, 3)))
    content = {
        "images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
        "categories": [{"id": 5, "name": "nucleus"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "iscrowd": 0, "area": 16, "bbox": [2, 2, 4, 4],
                         "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(content))
    assert detect_format(tmp_path) == "coco"
    dataset = open_dataset(tmp_path / "instances.json", "train", augment=False, val_every=2)
    assert dataset.classes == ("background", "nucleus") and len(dataset) == 1
    sample = dataset[0]
    assert sample["image"].dtype == torch.float32 and sample["mask"].dtype == torch.int64
    assert set(sample["mask"].unique().tolist()) == {0, 1} and 16 <= int(sample["mask"].sum()) <= 25
    resized = open_dataset(tmp_path, "train", image_size=20, augment=False, val_every=2)[0]
    assert resized["image"].shape == (3, 20, 20) and resized["mask"].shape == (20, 20)


def test_coco_sets_tell_their_image_sizes_for_batches_of_one_size(tmp_path, helpers, rng):
    images, annotations = [], []
    for k, (height, width) in enumerate([(10, 12), (8, 8), (10, 12)]):
        helpers.rgb(tmp_path / "images" / f"{k}.png", rng.integers(0, 256, size=(height, width, 3)))
        images.append({"id": k + 1, "file_name": f"{k}.png", "height": height, "width": width})
        annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 5, "iscrowd": 0, "area": 4,
                            "bbox": [1, 1, 2, 2], "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]})
    content = {"images": images, "categories": [{"id": 5, "name": "nucleus"}], "annotations": annotations}
    (tmp_path / "instances.json").write_text(json.dumps(content))
    dataset = open_dataset(tmp_path / "instances.json", None, augment=False)
    assert dataset.image_sizes() == [(12, 10), (8, 8), (12, 10)]  # (width, height), from the JSON
    batches = equal_size_batches(dataset, 4)
    assert batches == [[0, 2], [1]]
    assert all(len({tuple(dataset[i]["image"].shape) for i in batch}) == 1 for batch in batches)


def test_open_dataset_errors_name_the_culprit(tmp_path, helpers, rng):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"cannot tell the format.*choose with --format"):
        open_dataset(tmp_path)
    for sub in ("images", "masks"):  # the images/ folder given for the data set's own
        (tmp_path / "folder" / sub).mkdir(parents=True)
    with pytest.raises(ValueError, match=f"images is the data set's images/ folder; give the folder that holds images/ "
                                         f"and masks/, {tmp_path / 'folder'}"):
        open_dataset(tmp_path / "folder" / "images")
    _camvid(tmp_path, helpers, rng)
    with pytest.raises(ValueError, match="'pascal'"):
        open_dataset(tmp_path, format="pascal")
    with pytest.raises(ValueError, match="colour_table"):
        open_dataset(tmp_path, format="camvid", colour_table="x.yaml")
    with pytest.raises(ValueError, match="flip"):
        open_dataset(tmp_path, augment={"flip": 0.5})
    # the trainer passes synthetic options everywhere; a real data set ignores them
    assert len(open_dataset(tmp_path, "train", num_samples=5, seed=1)) == 2


def test_synthetic_branch_is_unchanged():
    dataset = open_dataset("synthetic", "val", format=None, image_size=24, augment=None, num_samples=3, num_classes=4, seed=2)
    reference = SyntheticShapes(num_samples=3, image_size=24, num_classes=4, split="val", seed=2)
    assert isinstance(dataset, SyntheticShapes) and len(dataset) == 3
    assert torch.equal(dataset[1]["image"], reference[1]["image"]) and torch.equal(dataset[1]["mask"], reference[1]["mask"])
