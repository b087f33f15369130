"""COCO keypoint evaluation: AP / AR over object keypoint similarity (OKS).

The evaluation is pycocotools' COCOeval with iouType "keypoints" (the COCO keypoint task; OKS
after Ronchi & Perona, "Benchmarking and Error Diagnosis in Multi-Instance Pose Estimation",
ICCV 2017). OKS plays the part IoU plays for masks:

    OKS = sum_i exp(-d_i^2 / (2 s^2 k_i^2)) [v_i > 0] / sum_i [v_i > 0],   k_i = 2 sigma_i,

with d_i the distance from the predicted to the true keypoint i, s^2 the ground truth's area and
v_i its visibility. Ground truths without a visible keypoint are ignored, as in COCO.

Conventions (torchvision's KeypointRCNN): per image, predictions are a dict with "boxes" (N x 4,
XYXY), "labels" (N), "scores" (N) and "keypoints" (N x J x 3: x, y and an ignored third column;
"keypoints_scores" may be present and is not used, COCO ranks instances by their score);
targets a dict with "boxes", "labels", "keypoints" (N x J x 3, visibility 0/1/2) and optionally
"area" (N; the box area when missing) and "iscrowd". Labels are COCO category ids unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from seglab.metrics._distributed import gather_objects
from seglab.metrics.coco import _categories, _category_names, _coco, _figures, _run, _xyxy_to_xywh

__all__ = ["COCOKeypointEvaluator", "keypoint_results"]

# Order of COCOeval.stats for iouType "keypoints" (pycocotools summarize()).
_STAT_NAMES = ("ap", "ap50", "ap75", "apm", "apl", "ar", "ar50", "ar75", "arm", "arl")


def _keypoints(keypoints: torch.Tensor, what: str, num_keypoints: int | None) -> torch.Tensor:
    """N x J x 3 keypoints as float32 on the CPU, checked against the expected J."""
    keypoints = keypoints.detach().to("cpu", torch.float32)
    if len(keypoints) == 0:
        return keypoints.reshape(0, num_keypoints or 0, 3)
    if keypoints.dim() != 3 or keypoints.shape[2] != 3:
        raise ValueError(f"{what} must be N x J x 3, got shape {tuple(keypoints.shape)}")
    if num_keypoints is not None and keypoints.shape[1] != num_keypoints:
        raise ValueError(f"{what} have {keypoints.shape[1]} keypoints per instance but {num_keypoints} sigmas were given")
    return keypoints


def _detections(prediction: Mapping[str, torch.Tensor], num_keypoints: int | None = None) -> list[dict[str, Any]]:
    """COCO keypoint results records of one image, without the image id."""
    keypoints = _keypoints(prediction["keypoints"], "predicted keypoints", num_keypoints)
    # A results file claims every keypoint (v = 1); OKS reads only the ground truth's visibility.
    keypoints = torch.cat([keypoints[:, :, :2], torch.ones_like(keypoints[:, :, 2:])], dim=2)
    boxes = _xyxy_to_xywh(prediction["boxes"])
    labels = prediction["labels"].tolist()
    scores = prediction["scores"].float().tolist()
    if not len(keypoints) == len(boxes) == len(labels) == len(scores):
        raise ValueError("prediction keypoints, boxes, labels and scores have different lengths")
    return [
        {"category_id": int(label), "score": float(score), "keypoints": points.flatten().tolist(), "bbox": box}
        for points, box, label, score in zip(keypoints, boxes, labels, scores)
    ]


def keypoint_results(predictions: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO keypoint results records (the list a results JSON holds), one per predicted instance.

    Each record: image_id, category_id (the label), score, keypoints ([x, y, 1] * J, floats) and
    bbox (XYWH). `seglab.metrics.save_coco_results` writes them as a file.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"got {len(predictions)} predictions for {len(image_ids)} image ids")
    return [
        {"image_id": int(image_id), **record}
        for prediction, image_id in zip(predictions, image_ids)
        for record in _detections(prediction)
    ]


def _ground_truths(target: Mapping[str, torch.Tensor], num_keypoints: int) -> list[dict[str, Any]]:
    keypoints = _keypoints(target["keypoints"], "target keypoints", num_keypoints)
    boxes = _xyxy_to_xywh(target["boxes"])
    labels = target["labels"].tolist()
    if "area" in target:
        areas = target["area"].float().tolist()
    else:
        areas = [width * height for _, _, width, height in boxes]
    iscrowd = target.get("iscrowd", torch.zeros(len(labels), dtype=torch.int64)).tolist()
    if not len(keypoints) == len(boxes) == len(labels) == len(areas) == len(iscrowd):
        raise ValueError("target keypoints, boxes, labels, area and iscrowd have different lengths")
    return [
        {
            "category_id": int(label),
            "keypoints": points.flatten().tolist(),
            # COCOeval ignores a ground truth whose num_keypoints is 0.
            "num_keypoints": int((points[:, 2] > 0).sum()),
            "area": float(area),
            "bbox": box,
            "iscrowd": int(crowd),
        }
        for points, box, label, area, crowd in zip(keypoints, boxes, labels, areas, iscrowd)
    ]


class COCOKeypointEvaluator:
    """Streaming COCO keypoint AP / AR (OKS) for pose estimation.

    sigmas: the data set's per-keypoint OKS sigmas (J of them; COCO's person sigmas for its 17
    keypoints). categories: None (the labels seen), an int K (labels 0..K-1), a sequence of names
    (label i is names[i]) or a mapping label -> name; categories without ground truth are left
    out of the means, as COCOeval does, so a background entry is harmless. max_detections: the
    instances kept per image and category, by score (COCO's keypoint protocol keeps 20).

    compute() returns floats: ap (OKS AP@[.5:.95]), ap50, ap75, apm, apl, ar, ar50, ar75, arm,
    arl (COCOeval's keypoint summary), and ap_per_class (name -> OKS AP). Figures COCOeval cannot
    define (no ground truth at all, no large person) are NaN.
    """

    def __init__(
        self,
        sigmas: Sequence[float],
        categories: int | Sequence[str] | Mapping[int, str] | None = None,
        *,
        max_detections: int = 20,
    ) -> None:
        self.sigmas = np.asarray(sigmas, dtype=np.float64)
        if self.sigmas.ndim != 1 or len(self.sigmas) == 0:
            raise ValueError(f"sigmas must be a non-empty sequence of floats, got shape {self.sigmas.shape}")
        self.categories = _category_names(categories)
        self.max_detections = max_detections
        self.reset()

    def reset(self) -> None:
        self._images: list[dict[str, list[dict[str, Any]]]] = []

    @torch.no_grad()
    def update(self, predictions: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Add one batch: lists of per-image prediction and target dicts (torchvision convention)."""
        if len(predictions) != len(targets):
            raise ValueError(f"got {len(predictions)} predictions for {len(targets)} targets")
        num_keypoints = len(self.sigmas)
        for prediction, target in zip(predictions, targets):
            self._images.append({"gt": _ground_truths(target, num_keypoints), "dt": _detections(prediction, num_keypoints)})

    def compute(self) -> dict[str, Any]:
        images = gather_objects(self._images)
        image_entries, gt_annotations, dt_annotations = [], [], []
        for image_id, image in enumerate(images, start=1):
            image_entries.append({"id": image_id})
            for annotation in image["gt"]:
                gt_annotations.append({**annotation, "id": len(gt_annotations) + 1, "image_id": image_id})
            for record in image["dt"]:
                # COCOeval filters detections by area range; the box area, as loadRes gives a
                # results file whose records carry a bbox.
                area = record["bbox"][2] * record["bbox"][3]
                dt_annotations.append({**record, "id": len(dt_annotations) + 1, "image_id": image_id, "area": area, "iscrowd": 0})
        results: dict[str, Any] = dict.fromkeys(_STAT_NAMES, float("nan"))
        results["ap_per_class"] = {}
        if not gt_annotations:
            return results  # nothing to detect: every figure is undefined
        categories, names = _categories(self.categories, gt_annotations + dt_annotations)
        gt = _coco(image_entries, categories, gt_annotations)
        dt = _coco(image_entries, categories, dt_annotations)
        evaluation = _run(COCOeval, gt, dt, self.max_detections, iou_type="keypoints", oks_sigmas=self.sigmas)
        results.update(_figures(evaluation, _STAT_NAMES, names))
        return results
