"""COCO mask AP / AR and boundary AP through pycocotools.

The evaluation is pycocotools' own COCOeval; these tests check the adapter: AP 1.0 when
predictions equal ground truth, hand-worked IoU thresholds, and a round trip through COCO JSON
files evaluated by plain pycocotools giving the same numbers as COCOMaskEvaluator.
"""
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from seglab.metrics import (
    COCOMaskEvaluator,
    boundary_iou,
    coco_results,
    save_coco_results,
)


def _instances(seed, n_images=3, size=48):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(n_images):
        count = int(torch.randint(1, 4, (1,), generator=g))
        masks = torch.zeros(count, size, size, dtype=torch.uint8)
        for i in range(count):
            y, x = torch.randint(0, size - 12, (2,), generator=g).tolist()
            h, w = torch.randint(4, 12, (2,), generator=g).tolist()
            masks[i, y : y + h, x : x + w] = 1
        labels = torch.randint(1, 3, (count,), generator=g)
        targets.append({"masks": masks, "labels": labels})
    return targets


def test_predictions_equal_to_ground_truth_score_one():
    targets = _instances(0)
    predictions = [
        {"masks": t["masks"].float()[:, None] * 0.8, "labels": t["labels"], "scores": torch.linspace(0.9, 0.5, len(t["labels"]))}
        for t in targets
    ]
    evaluator = COCOMaskEvaluator(categories=["background", "a", "b"])
    evaluator.update(predictions[:2], targets[:2])
    evaluator.update(predictions[2:], targets[2:])
    r = evaluator.compute()
    for key in ("ap", "ap50", "ap75", "aps", "ar", "boundary_ap", "boundary_ap50", "boundary_ap75"):
        assert r[key] == pytest.approx(1.0), key
    assert math.isnan(r["apl"])  # no large object: COCOeval cannot define it
    assert set(r["ap_per_class"]) <= {"a", "b"} and all(v == pytest.approx(1.0) for v in r["ap_per_class"].values())


def test_hand_worked_iou_thresholds_for_mask_and_boundary_ap():
    gt = torch.zeros(1, 64, 64, dtype=torch.bool)
    gt[0, 10:40, 10:40] = True
    pred = gt.clone()
    pred[0, 10:40, 10:12] = False  # mask IoU = 840 / 900 = 0.933
    evaluator = COCOMaskEvaluator()
    evaluator.update([{"masks": pred, "labels": torch.tensor([1]), "scores": torch.tensor([0.7])}], [{"masks": gt, "labels": torch.tensor([1])}])
    r = evaluator.compute()
    # A single true positive counts at the IoU thresholds 0.50, 0.55, ..., 0.90 (9 of 10).
    assert r["ap"] == pytest.approx(0.9) and r["ap50"] == pytest.approx(1.0) and r["ap75"] == pytest.approx(1.0)
    quality = min(840 / 900, float(boundary_iou(pred[0], gt[0])))
    passed = sum(quality >= t - 1e-12 for t in np.linspace(0.5, 0.95, 10))
    assert r["boundary_ap"] == pytest.approx(passed / 10)
    assert r["boundary_ap"] < r["ap"]  # the boundary sees the missing strip more strongly


def test_no_detections_and_no_ground_truth():
    target = {"masks": torch.ones(1, 20, 20, dtype=torch.uint8), "labels": torch.tensor([1])}
    empty = {"masks": torch.zeros(0, 1, 20, 20), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    evaluator = COCOMaskEvaluator()
    evaluator.update([empty], [target])
    assert evaluator.compute()["ap"] == 0.0
    evaluator.reset()
    evaluator.update([empty], [{"masks": torch.zeros(0, 20, 20), "labels": torch.zeros(0, dtype=torch.long)}])
    assert math.isnan(evaluator.compute()["ap"])
    with pytest.raises(ValueError, match="predictions"):
        evaluator.update([empty, empty], [target])


def test_round_trip_through_coco_json_matches_plain_pycocotools(tmp_path):
    targets = _instances(1, n_images=4)
    g = torch.Generator().manual_seed(2)
    predictions = []
    for t in targets:
        # Jitter each ground truth, add one false positive, shuffle the scores.
        masks = torch.roll(t["masks"], shifts=int(torch.randint(-2, 3, (1,), generator=g)), dims=2).float()
        false_positive = torch.zeros(1, *masks.shape[1:])
        false_positive[0, :6, :6] = 1
        masks = torch.cat([masks, false_positive])
        labels = torch.cat([t["labels"], torch.tensor([1])])
        predictions.append({"masks": masks, "labels": labels, "scores": torch.rand(len(labels), generator=g)})
    evaluator = COCOMaskEvaluator(boundary=False)
    evaluator.update(predictions, targets)
    ours = evaluator.compute()

    image_ids = [101, 102, 103, 104]
    records = coco_results(predictions, image_ids)
    assert records == [{**r, "image_id": r["image_id"] + 100} for r in evaluator.coco_results()]
    results_file = save_coco_results(records, tmp_path / "results.json")
    annotations = []
    for image_id, t in zip(image_ids, targets):
        rles = mask_utils.encode(np.asfortranarray(t["masks"].permute(1, 2, 0).numpy()))
        for rle, label in zip(rles, t["labels"].tolist()):
            rle["counts"] = rle["counts"].decode()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label, "segmentation": rle,
                                "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({"images": [{"id": i, "height": 48, "width": 48} for i in image_ids],
                                   "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": annotations}))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        evaluation = COCOeval(gt, gt.loadRes(str(results_file)), iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    names = ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar1", "ar10", "ar", "ars", "arm", "arl")
    for name, value in zip(names, evaluation.stats):
        expected = float("nan") if value < 0 else value
        assert ours[name] == pytest.approx(expected, nan_ok=True), name
    assert 0 < ours["ap"] < 1  # the case is not trivial
