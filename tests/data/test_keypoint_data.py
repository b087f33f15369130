"""Keypoint samples: the synthetic stick figures, COCO keypoint files, augmentation that keeps
left and right straight, and the opener."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import Params
from torchvision import tv_tensors

from seglab.data.instance import collate_instances
from seglab.data.keypoints import (
    COCO_PERSON_KEYPOINTS,
    COCO_PERSON_SIGMAS,
    DEFAULT_SIGMA,
    CocoKeypoints,
    SyntheticPoses,
    flip_pairs_of,
    keypoint_sigmas,
    keypoint_target,
    keypoint_transforms,
    open_keypoint_dataset,
)

HEAD, NECK, HIP, LEFT_HAND, RIGHT_HAND = range(5)


def _samples(data):
    return [data[i] for i in range(len(data))]


def test_synthetic_samples_follow_the_contract():
    data = SyntheticPoses(num_samples=6, image_size=(64, 80), seed=3)
    assert data.classes == ("background", "figure") and data.num_classes == 2 and len(data.palette) == 2
    assert data.keypoint_names == ("head", "neck", "hip", "left_hand", "right_hand", "left_foot", "right_foot")
    assert data.skeleton == ((0, 1), (1, 3), (1, 4), (1, 2), (2, 5), (2, 6))
    assert data.flip_pairs == ((3, 4), (5, 6)) and data.sigmas == (DEFAULT_SIGMA,) * 7
    for index, (image, target) in enumerate(_samples(data)):
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32 and image.shape == (3, 64, 80)
        assert 0 <= image.min() and image.max() <= 1
        boxes, count = target["boxes"], len(target["labels"])
        assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format.name == "XYXY" and boxes.canvas_size == (64, 80)
        assert boxes.dtype == target["keypoints"].dtype == target["area"].dtype == torch.float32
        assert target["labels"].dtype == torch.int64 and (target["labels"] == 1).all() and count >= 1
        assert boxes.shape == (count, 4) and target["keypoints"].shape == (count, 7, 3) and target["area"].shape == (count,)
        assert torch.equal(target["area"], (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        assert boxes.eq(boxes.round()).all()  # whole pixels
        assert target["image_id"] == index


def test_synthetic_samples_are_deterministic_per_seed_split_and_index():
    image, target = SyntheticPoses(num_samples=4, seed=7)[2]
    again, same = SyntheticPoses(num_samples=4, seed=7)[2]
    assert torch.equal(image, again) and torch.equal(target["keypoints"], same["keypoints"])
    assert torch.equal(target["boxes"], same["boxes"])
    other, _ = SyntheticPoses(num_samples=4, seed=7, split="val")[2]
    assert not torch.equal(image, other)


def test_visibility_says_inside_and_boxes_hold_the_visible_keypoints():
    height, width = 48, 64
    data = SyntheticPoses(num_samples=40, image_size=(height, width), seed=1)
    outside_seen = 0
    for _, target in _samples(data):
        points = target["keypoints"]
        x, y, v = points.unbind(-1)
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        assert torch.equal(v == 0, ~inside)  # every keypoint is labelled; 0 means exactly "outside"
        assert (v == 2).any(1).all()
        x1, y1, x2, y2 = (c[:, None] for c in target["boxes"].unbind(-1))
        in_box = (x >= x1) & (x <= x2) & (y >= y1) & (y <= y2)
        assert in_box[v > 0].all()
        outside_seen += int((~inside).sum())
    assert outside_seen > 0  # figures do stand partly outside
    crowded = SyntheticPoses(num_samples=8, image_size=32, seed=0, max_figures=12)  # some figures vanish under others
    assert all((t["keypoints"][..., 2] == 2).any(1).all() for _, t in _samples(crowded))


def test_figures_stand_upright_with_their_left_hand_on_the_left():
    targets = [t for _, t in _samples(SyntheticPoses(num_samples=40, seed=2))]
    points = torch.cat([t["keypoints"] for t in targets])
    assert (points[:, HEAD, 1] < points[:, HIP, 1]).all()
    left_first = (points[:, LEFT_HAND, 0] < points[:, RIGHT_HAND, 0]).float().mean()
    assert left_first > 0.9


def test_a_keypoint_under_a_later_figure_is_labelled_but_not_visible():
    data = SyntheticPoses(num_samples=60, image_size=64, seed=0, max_figures=4)
    hidden = [(t, n, k) for _, t in _samples(data) for n, k in zip(*torch.where(t["keypoints"][..., 2] == 1))]
    assert hidden
    target, figure, joint = hidden[0]
    x, y, _ = target["keypoints"][figure, joint].tolist()
    assert 0 <= x < 64 and 0 <= y < 64
    later_boxes = target["boxes"][figure + 1:].tolist()
    assert any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in later_boxes)  # a figure drawn over it
    lonely = SyntheticPoses(num_samples=30, image_size=64, seed=0, max_figures=1)
    assert all((t["keypoints"][..., 2] != 1).all() for _, t in _samples(lonely))  # nothing to hide behind


@pytest.mark.parametrize("options, message", [
    ({"split": "holdout"}, "split must be one of train, val, test, not 'holdout'"),
    ({"num_samples": 0}, "num_samples must be positive, not 0"),
    ({"max_figures": 0}, "max_figures must be positive, not 0"),
    ({"image_size": (31, 64)}, r"image_size must be at least 32 pixels .*not \(31, 64\)"),
])
def test_synthetic_arguments_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        SyntheticPoses(**options)


def test_flip_pairs_and_oks_sigmas():
    assert flip_pairs_of(COCO_PERSON_KEYPOINTS) == ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
    assert flip_pairs_of(("right_paw", "tail", "left_paw", "left_ear")) == ((2, 0),)
    assert np.array_equal(np.array(COCO_PERSON_SIGMAS), Params(iouType="keypoints").kpt_oks_sigmas)  # COCOeval's own
    assert keypoint_sigmas(list(COCO_PERSON_KEYPOINTS)) == COCO_PERSON_SIGMAS
    assert DEFAULT_SIGMA == pytest.approx(np.mean(COCO_PERSON_SIGMAS))
    assert keypoint_sigmas(COCO_PERSON_KEYPOINTS[:5]) == (DEFAULT_SIGMA,) * 5


def _write_coco_keypoints(tmp_path, categories=None) -> str:
    """Three images; keypoint categories 1 and 4 around a category 3 without keypoints."""
    (tmp_path / "images").mkdir(exist_ok=True)
    images = [{"id": i, "file_name": f"{i}.png", "height": 20, "width": 24} for i in (5, 6, 9)]
    for info in images:
        Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(tmp_path / "images" / info["file_name"])
    names = ["nose", "left_eye", "right_eye"]
    categories = categories or [
        {"id": 1, "name": "person", "keypoints": names, "skeleton": [[1, 2], [1, 3]]},
        {"id": 3, "name": "blob"},
        {"id": 4, "name": "doll", "keypoints": names, "skeleton": [[1, 2], [1, 3]]},
    ]
    annotation = {"iscrowd": 0, "bbox": [6, 2, 8, 6], "area": 30.0, "num_keypoints": 2, "keypoints": [10, 5, 2, 8, 4, 1, 0, 0, 0]}
    annotations = [
        {**annotation, "id": 1, "image_id": 5, "category_id": 4},
        {**annotation, "id": 2, "image_id": 5, "category_id": 1, "iscrowd": 1},
        {**annotation, "id": 3, "image_id": 5, "category_id": 1, "num_keypoints": 0},  # COCOeval ignores it too
        {"id": 4, "image_id": 5, "category_id": 3, "iscrowd": 0, "bbox": [0, 0, 4, 4], "area": 16.0},
        {"id": 5, "image_id": 6, "category_id": 1, "iscrowd": 0, "bbox": [1, 2, 10, 5], "num_keypoints": 3,
         "keypoints": [3, 4, 2, 2, 3, 2, 5, 3, 2]},
        {**annotation, "id": 6, "image_id": 6, "category_id": 1, "bbox": [3, 3, 0, 4]},  # an empty box
    ]
    path = tmp_path / "person_keypoints.json"
    path.write_text(json.dumps({"images": images, "categories": categories, "annotations": annotations}))
    return str(path)


def test_coco_keypoints_read_labels_boxes_keypoints_and_areas(tmp_path):
    data = CocoKeypoints(_write_coco_keypoints(tmp_path))
    assert data.classes == ("background", "person", "doll") and data.num_classes == 3
    assert data.category_of_label == {1: 1, 2: 4}  # category 3 lists no keypoints
    assert data.keypoint_names == ("nose", "left_eye", "right_eye") and data.skeleton == ((0, 1), (0, 2))
    assert data.flip_pairs == ((1, 2),) and data.sigmas == (DEFAULT_SIGMA,) * 3
    image, first = data[0]
    assert image.shape == (3, 20, 24) and first["image_id"] == 5
    assert first["labels"].tolist() == [2]  # the crowd and the unlabelled person are left out
    assert first["boxes"].tolist() == [[6.0, 2.0, 14.0, 8.0]] and first["area"].tolist() == [30.0]
    assert first["keypoints"].tolist() == [[[10.0, 5.0, 2.0], [8.0, 4.0, 1.0], [0.0, 0.0, 0.0]]]
    _, second = data[1]
    assert second["labels"].tolist() == [1] and second["area"].tolist() == [50.0]  # no "area": the box's; no empty box
    _, third = data[2]
    assert third["boxes"].shape == (0, 4) and third["keypoints"].shape == (0, 3, 3) and third["area"].shape == (0,)


def test_coco_keypoints_split_and_refuse_files_without_one_keypoint_layout(tmp_path):
    path = _write_coco_keypoints(tmp_path)
    train, val = (CocoKeypoints(path, split=split, val_every=3) for split in ("train", "val"))
    assert train.file.image_ids == [5, 6] and val.file.image_ids == [9]
    with pytest.raises(ValueError, match="has no keypoint categories"):
        CocoKeypoints(_write_coco_keypoints(tmp_path, [{"id": 1, "name": "blob"}]))
    clash = [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye", "right_eye"]},
             {"id": 4, "name": "doll", "keypoints": ["nose", "tail", "paw"]}]
    with pytest.raises(ValueError, match="'person' and 'doll' list different keypoints"):
        CocoKeypoints(_write_coco_keypoints(tmp_path, clash))
    document = json.loads((tmp_path / "person_keypoints.json").read_text())
    document["categories"] = [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye", "right_eye"]}]
    document["annotations"][-2]["keypoints"] = [3, 4, 2, 2, 3, 2]
    (tmp_path / "person_keypoints.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="annotation 5 in person_keypoints.json has 6 keypoint values; .* need 9"):
        CocoKeypoints(path)[1]


def _augment(data, index, seed, **options):
    torch.manual_seed(seed)
    return keypoint_transforms(True, data.flip_pairs, **options)(*data[index])


def test_a_flip_mirrors_the_figures_and_swaps_left_and_right():
    data = SyntheticPoses(num_samples=1, image_size=64, seed=5, max_figures=3)
    _, original = data[0]
    width = 64
    outcomes = set()
    for seed in range(12):
        _, target = _augment(data, 0, seed, scale=(1.0, 1.0))
        if torch.allclose(target["boxes"], original["boxes"]):
            assert torch.allclose(target["keypoints"], original["keypoints"], atol=1e-4)
            outcomes.add("kept")
            continue
        outcomes.add("flipped")
        x1, y1, x2, y2 = original["boxes"].unbind(-1)
        assert torch.allclose(target["boxes"], torch.stack([width - x2, y1, width - x1, y2], -1))
        mirrored = original["keypoints"].clone()
        mirrored[..., 0] = width - mirrored[..., 0]
        for left, right in data.flip_pairs:  # the old right hand, mirrored, is the new left hand
            assert torch.allclose(target["keypoints"][:, left], mirrored[:, right], atol=1e-4)
            assert torch.allclose(target["keypoints"][:, right], mirrored[:, left], atol=1e-4)
        assert torch.allclose(target["keypoints"][:, HEAD], mirrored[:, HEAD], atol=1e-4)
        assert (target["keypoints"][:, LEFT_HAND, 0] < target["keypoints"][:, RIGHT_HAND, 0]).all()
        assert torch.equal(target["area"], original["area"])
    assert outcomes == {"kept", "flipped"}
    assert keypoint_transforms(False, data.flip_pairs) is None


class _Handmade(torch.utils.data.Dataset):
    """One 41 x 41 sample: figure 1 with a keypoint at the centre and one at the left edge,
    figure 2 (area 9) with keypoints only near the corners."""

    flip_pairs = ()

    def __getitem__(self, index):
        keypoints = torch.tensor([[[20.5, 20.5, 2], [0.5, 20.5, 2]], [[1.5, 1.5, 2], [39.5, 39.5, 2]]])
        boxes = torch.tensor([[0.0, 19.0, 22.0, 22.0], [1.0, 1.0, 40.0, 40.0]])
        target = keypoint_target(boxes, torch.tensor([1, 2]), keypoints, torch.tensor([66.0, 9.0]), 0, (41, 41))
        return tv_tensors.Image(torch.rand(3, 41, 41)), target


def test_a_crop_hides_keypoints_outside_it_and_drops_objects_left_without_any():
    dropped = hidden = 0
    for seed in range(10):
        image, target = _augment(_Handmade(), 0, seed, crop_size=21, scale=(1.0, 1.0))
        assert image.shape == (3, 21, 21)
        x, y, v = target["keypoints"].unbind(-1)
        inside = (x >= 0) & (x < 21) & (y >= 0) & (y < 21)
        assert not (v[~inside] > 0).any() and (v[inside] == 2).all()
        assert len(target["labels"]) == len(target["boxes"]) == len(target["area"]) == len(target["keypoints"])
        assert target["labels"][0] == 1 and target["area"][0] == 66.0  # the centre is in every 21 x 21 crop
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 21)).all()
        dropped += 2 not in target["labels"].tolist()
        hidden += int(v[0, 1] == 0)
    assert dropped > 0 and hidden > 0


def test_a_zoom_scales_the_area_and_hides_what_it_pushes_out():
    torch.manual_seed(0)
    image, target = keypoint_transforms(True, (), scale=(2.0, 2.0))(*_Handmade()[0])
    assert image.shape == (3, 41, 41)
    assert target["labels"].tolist() == [1] and target["area"].tolist() == [4 * 66.0]  # figure 2 zoomed out of sight
    assert target["keypoints"][0, :, 2].tolist() == [2.0, 0.0]
    assert torch.allclose(target["keypoints"][0, 0, :2], torch.tensor([20.5, 20.5]))


def test_open_keypoint_dataset_routes_and_names_what_it_cannot_open(tmp_path):
    synthetic = open_keypoint_dataset("synthetic", "val", num_samples=3, image_size=48)
    assert isinstance(synthetic, SyntheticPoses) and len(synthetic) == 3 and synthetic.split == "val"
    images, targets = collate_instances([synthetic[0], synthetic[1]])
    assert len(images) == len(targets) == 2
    path = _write_coco_keypoints(tmp_path)
    assert isinstance(open_keypoint_dataset(path, "all"), CocoKeypoints)
    folder = open_keypoint_dataset(str(tmp_path), "val", val_every=3)
    assert isinstance(folder, CocoKeypoints) and folder.file.image_ids == [9]
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match=f"{tmp_path}.*expected one COCO keypoint"):
        open_keypoint_dataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'nowhere/poses.json' is neither 'synthetic'"):
        open_keypoint_dataset("nowhere/poses.json")
