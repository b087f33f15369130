"""COCO keypoint AP / AR (OKS) through pycocotools.

The evaluation is pycocotools' own COCOeval; these tests check the adapter: AP 1.0 when
predictions equal ground truth, OKS worked by hand against the AP thresholds, COCO's handling of
invisible keypoints, and the same figures as COCOeval run directly on hand-built COCO records or
on a results file.
"""
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from seglab.metrics import COCOKeypointEvaluator, keypoint_results, save_coco_results

SIGMAS = [0.05, 0.08, 0.10, 0.06, 0.07]
STAT_NAMES = ("ap", "ap50", "ap75", "apm", "apl", "ar", "ar50", "ar75", "arm", "arl")
THRESHOLDS = np.linspace(0.5, 0.95, 10)


def _person(x0=10.0, y0=20.0, size=50.0, visibility=(2, 2, 1, 2, 2), label=1):
    """One 50 x 50 ground truth (area 2500, COCO "medium") with five keypoints inside its box."""
    points = torch.tensor([[x0 + 10 + 7 * i, y0 + 5 + 9 * i] for i in range(len(visibility))])
    keypoints = torch.cat([points, torch.tensor(visibility, dtype=torch.float32)[:, None]], dim=1)
    return {
        "boxes": torch.tensor([[x0, y0, x0 + size, y0 + size]]),
        "labels": torch.tensor([label]),
        "keypoints": keypoints[None],
        "area": torch.tensor([size * size]),
    }


def _as_prediction(target, shift=None, score=1.0):
    """The target's instances as torchvision predictions (third keypoint column 1), moved by `shift` (J x 2)."""
    keypoints = target["keypoints"].clone()
    keypoints[:, :, 2] = 1
    if shift is not None:
        keypoints[:, :, :2] += shift
    count = len(target["labels"])
    return {
        "boxes": target["boxes"].clone(),
        "labels": target["labels"].clone(),
        "scores": torch.full((count,), score),
        "keypoints": keypoints,
        "keypoints_scores": torch.ones(count, keypoints.shape[1]),
    }


def _hand_oks(distance, area, visibility, sigmas=SIGMAS):
    """OKS from its definition: the mean over visible keypoints of exp(-d^2 / (2 s^2 (2 sigma)^2))."""
    k = 2 * np.asarray(sigmas)
    similarity = np.exp(-np.asarray(distance, dtype=float) ** 2 / (2 * area * k**2))
    visible = np.asarray(visibility) > 0
    return similarity[visible].mean()


def _evaluate(predictions, targets, **options):
    evaluator = COCOKeypointEvaluator(SIGMAS, **options)
    evaluator.update(predictions, targets)
    return evaluator.compute()


def _assert_same_results(ours, theirs):
    assert {name: ours[name] for name in STAT_NAMES} == pytest.approx({name: theirs[name] for name in STAT_NAMES}, nan_ok=True)
    assert ours["ap_per_class"] == pytest.approx(theirs["ap_per_class"])


def test_ground_truth_as_predictions_gives_ap_one():
    targets = [_person(), _person(x0=80.0, label=1)]
    r = _evaluate([_as_prediction(t) for t in targets], targets)
    assert r["ap"] == r["ap50"] == r["ap75"] == r["ar"] == pytest.approx(1.0)
    assert r["apm"] == pytest.approx(1.0) and math.isnan(r["apl"])  # no large person
    assert set(r) == set(STAT_NAMES) | {"ap_per_class"}


def test_shifted_prediction_counts_at_the_thresholds_its_hand_worked_oks_passes():
    target = _person()
    distance = 7.0
    oks = _hand_oks([distance] * 5, 2500.0, [2, 2, 1, 2, 2])
    assert 0.5 < oks < 0.75  # the case the test is about: a hit at 0.5, a miss at 0.75
    shift = torch.tensor([[distance, 0.0]] * 5)
    r = _evaluate([_as_prediction(target, shift)], [target])
    assert r["ap50"] == pytest.approx(1.0) and r["ap75"] == 0.0
    passed = int((oks >= THRESHOLDS - 1e-12).sum())
    assert r["ap"] == pytest.approx(passed / 10) and r["ar"] == pytest.approx(passed / 10)


def test_invisible_keypoints_do_not_count():
    target = _person(visibility=(0, 2, 1, 2, 2))
    shift = torch.tensor([[7.0, 0.0]] * 5)
    oks = _hand_oks([7.0] * 5, 2500.0, [0, 2, 1, 2, 2])
    base = _evaluate([_as_prediction(target, shift)], [target])
    assert base["ap"] == pytest.approx(int((oks >= THRESHOLDS - 1e-12).sum()) / 10)
    far_invisible = shift.clone()
    far_invisible[0] = torch.tensor([500.0, -300.0])
    _assert_same_results(_evaluate([_as_prediction(target, far_invisible)], [target]), base)
    far_visible = shift.clone()
    far_visible[1] = torch.tensor([500.0, -300.0])
    assert _evaluate([_as_prediction(target, far_visible)], [target])["ap"] < base["ap"]


def test_ground_truth_without_visible_keypoint_is_ignored():
    visible, hidden = _person(), _person(x0=100.0, visibility=(0, 0, 0, 0, 0))
    both = {key: torch.cat([visible[key], hidden[key]]) for key in visible}
    r = _evaluate([_as_prediction(visible)], [both])
    assert r["ap"] == pytest.approx(1.0) and r["ar"] == pytest.approx(1.0)  # the hidden one is no miss
    r = _evaluate([_as_prediction(hidden)], [hidden])
    assert all(math.isnan(r[name]) for name in STAT_NAMES)  # nothing left to find


def test_no_ground_truth_and_no_predictions():
    empty_target = {
        "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "keypoints": torch.zeros(0, 5, 3)
    }
    r = _evaluate([_as_prediction(_person())], [empty_target])
    assert all(math.isnan(r[name]) for name in STAT_NAMES) and r["ap_per_class"] == {}
    empty_prediction = _as_prediction(empty_target)
    r = _evaluate([empty_prediction], [_person()])
    assert r["ap"] == 0.0 and r["ar"] == 0.0
    with pytest.raises(ValueError, match="predictions"):
        COCOKeypointEvaluator(SIGMAS).update([empty_prediction, empty_prediction], [_person()])


def test_ap_per_class_with_category_names():
    person, dog = _person(label=1), _person(x0=100.0, label=2)
    predictions = [_as_prediction(person), _as_prediction(dog, torch.tensor([[7.0, 0.0]] * 5))]
    oks = _hand_oks([7.0] * 5, 2500.0, [2, 2, 1, 2, 2])
    dog_ap = int((oks >= THRESHOLDS - 1e-12).sum()) / 10
    for categories in (["background", "person", "dog"], {1: "person", 2: "dog"}):
        r = _evaluate(predictions, [person, dog], categories=categories)
        assert r["ap_per_class"] == pytest.approx({"person": 1.0, "dog": dog_ap})
        assert r["ap"] == pytest.approx((1.0 + dog_ap) / 2)
    assert set(_evaluate(predictions, [person, dog])["ap_per_class"]) == {"1", "2"}


def _scene(seed, n_images=3, num_keypoints=5):
    """Random people of two categories, some keypoints invisible, and noisy predictions of them."""
    g = torch.Generator().manual_seed(seed)
    targets, predictions = [], []
    for image in range(n_images):
        count = int(torch.randint(2, 6, (1,), generator=g))
        corner = torch.rand(count, 2, generator=g) * 150
        size = 20 + torch.rand(count, 2, generator=g) * 110  # small, medium and large people
        points = corner[:, None] + torch.rand(count, num_keypoints, 2, generator=g) * size[:, None]
        visibility = torch.randint(0, 3, (count, num_keypoints), generator=g).float()
        visibility[0, 1:] = 2
        target = {
            "boxes": torch.cat([corner, corner + size], dim=1),
            "labels": torch.randint(1, 3, (count,), generator=g),
            "keypoints": torch.cat([points, visibility[..., None]], dim=2),
        }
        if image % 2 == 0:
            target["area"] = size.prod(dim=1) * 0.6  # a segment smaller than its box
        targets.append(target)
        # Keep all but the last person, moved by a few pixels, and add one false positive.
        kept = count - 1
        noisy = points[:kept] + torch.randn(kept, num_keypoints, 2, generator=g) * 4
        false_positive = torch.rand(1, num_keypoints, 2, generator=g) * 150
        keypoints = torch.cat([torch.cat([noisy, false_positive]), torch.ones(kept + 1, num_keypoints, 1)], dim=2)
        boxes = torch.cat([target["boxes"][:kept] + torch.randn(kept, 4, generator=g), torch.tensor([[0.0, 0.0, 150.0, 150.0]])])
        predictions.append(
            {
                "boxes": boxes,
                "labels": torch.cat([target["labels"][:kept], torch.tensor([1])]),
                "scores": torch.rand(kept + 1, generator=g),
                "keypoints": keypoints,
                "keypoints_scores": torch.rand(kept + 1, num_keypoints, generator=g),
            }
        )
    return predictions, targets


def _xywh(box):
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def _pycocotools_stats(gt, dt, sigmas):
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(gt, dt, iouType="keypoints")
        evaluation.params.kpt_oks_sigmas = np.asarray(sigmas)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


def _assert_same_stats(ours, stats):
    for name, value in zip(STAT_NAMES, stats):
        assert ours[name] == pytest.approx(float("nan") if value < 0 else value, nan_ok=True), name


def _gt_dataset(targets, image_ids):
    annotations = []
    for image_id, t in zip(image_ids, targets):
        boxes = t["boxes"].tolist()
        areas = t["area"].tolist() if "area" in t else [w * h for _, _, w, h in map(_xywh, boxes)]
        for box, label, points, area in zip(boxes, t["labels"].tolist(), t["keypoints"], areas):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label, "iscrowd": 0,
                                "keypoints": points.flatten().tolist(), "num_keypoints": int((points[:, 2] > 0).sum()),
                                "area": area, "bbox": _xywh(box)})
    return {"images": [{"id": i} for i in image_ids], "annotations": annotations,
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]}


def _in_memory(dataset):
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_random_case_matches_pycocotools_on_hand_built_records():
    sigmas = (np.random.default_rng(0).uniform(0.03, 0.12, 5)).tolist()
    predictions, targets = _scene(1)
    evaluator = COCOKeypointEvaluator(sigmas)
    evaluator.update(predictions[:1], targets[:1])
    evaluator.update(predictions[1:], targets[1:])
    ours = evaluator.compute()

    gt = _gt_dataset(targets, [1, 2, 3])
    detections = []
    for image_id, p in zip([1, 2, 3], predictions):
        for box, label, score, points in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist(), p["keypoints"]):
            x, y, w, h = _xywh(box)
            detections.append({"id": len(detections) + 1, "image_id": image_id, "category_id": label, "score": score,
                               "keypoints": points.flatten().tolist(), "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    stats = _pycocotools_stats(_in_memory(gt), _in_memory({**gt, "annotations": detections}), sigmas)
    _assert_same_stats(ours, stats)
    assert 0 < ours["ap"] < 1 and not math.isnan(ours["apl"])  # the case is not trivial

    # Fewer than 20 detections per image: a larger limit changes nothing (and the summary is read).
    wider = COCOKeypointEvaluator(sigmas, max_detections=100)
    wider.update(predictions, targets)
    _assert_same_results(wider.compute(), ours)


def test_keypoint_results_records_and_round_trip_through_json(tmp_path):
    predictions, targets = _scene(2)
    image_ids = [7, 8, 9]
    records = keypoint_results(predictions, image_ids)
    assert len(records) == sum(len(p["labels"]) for p in predictions)
    first = records[0]
    assert set(first) == {"image_id", "category_id", "score", "keypoints", "bbox"}
    assert first["image_id"] == 7 and isinstance(first["category_id"], int) and isinstance(first["score"], float)
    assert len(first["keypoints"]) == 15 and all(isinstance(v, float) for v in first["keypoints"])
    assert first["keypoints"][2::3] == [1.0] * 5
    assert first["keypoints"][:2] == predictions[0]["keypoints"][0, 0, :2].tolist()
    x0, y0, x1, y1 = predictions[0]["boxes"][0].tolist()
    assert first["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    with pytest.raises(ValueError, match="image ids"):
        keypoint_results(predictions, image_ids[:2])

    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(_gt_dataset(targets, image_ids)))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
    exact = [_as_prediction(t) for t in targets]
    exact_file = save_coco_results(keypoint_results(exact, image_ids), tmp_path / "exact.json")
    with contextlib.redirect_stdout(io.StringIO()):
        stats = _pycocotools_stats(gt, gt.loadRes(str(exact_file)), SIGMAS)
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)

    noisy_file = save_coco_results(records, tmp_path / "noisy.json")
    with contextlib.redirect_stdout(io.StringIO()):
        stats = _pycocotools_stats(gt, gt.loadRes(str(noisy_file)), SIGMAS)
    _assert_same_stats(_evaluate(predictions, targets), stats)


def test_wrong_number_of_keypoints_names_the_sizes():
    target = _person()
    four = {**target, "keypoints": target["keypoints"][:, :4]}
    evaluator = COCOKeypointEvaluator(SIGMAS)
    with pytest.raises(ValueError, match="4 keypoints .* 5 sigmas"):
        evaluator.update([_as_prediction(target)], [four])
    with pytest.raises(ValueError, match="4 keypoints .* 5 sigmas"):
        evaluator.update([_as_prediction(four)], [target])
    with pytest.raises(ValueError, match="N x J x 3"):
        evaluator.update([_as_prediction(target)], [{**target, "keypoints": target["keypoints"][0]}])


def test_bfloat16_inputs():
    predictions, targets = _scene(3)

    def cast(items, dtype):
        return [{k: v.to(dtype) if v.is_floating_point() else v for k, v in item.items()} for item in items]

    low = _evaluate(cast(predictions, torch.bfloat16), cast(targets, torch.bfloat16))
    rounded = _evaluate(cast(cast(predictions, torch.bfloat16), torch.float32), cast(cast(targets, torch.bfloat16), torch.float32))
    _assert_same_results(low, rounded)
    assert 0 < low["ap"] < 1
    exact = cast(targets, torch.bfloat16)
    assert _evaluate([_as_prediction(t) for t in exact], exact)["ap"] == pytest.approx(1.0)
