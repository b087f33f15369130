"""COCO-protocol instance-segmentation metrics: mask AP/AR and boundary AP.

The evaluation itself is pycocotools' COCOeval (Lin et al., "Microsoft COCO", ECCV 2014), not a
re-implementation: this module only turns torchvision-style predictions and targets into COCO
records, streams them, and reads COCOeval's summary. Boundary AP follows Cheng et al.
("Boundary IoU", CVPR 2021): the same COCO protocol with the match quality of a detection and a
ground truth replaced by min(mask IoU, boundary IoU).

Conventions (torchvision's): per image, predictions are a dict with "masks" (N x 1 x H x W or
N x H x W, probabilities or bools), "labels" (N), "scores" (N) and optionally "boxes" (N x 4,
XYXY); targets a dict with "masks" (N x H x W, uint8 or bool), "labels" and optionally
"boxes" and "iscrowd". Labels are used as COCO category ids unchanged.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from seglab.metrics._distributed import gather_objects
from seglab.metrics.boundary import mask_to_boundary

__all__ = ["BoundaryCOCOeval", "COCOMaskEvaluator", "coco_results", "encode_masks", "save_coco_results"]

# Order of COCOeval.stats for iouType "segm" (pycocotools summarize()).
_STAT_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar1", "ar10", "ar", "ars", "arm", "arl")


def _binary_masks(masks: torch.Tensor, threshold: float) -> torch.Tensor:
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"instance masks must be N x H x W or N x 1 x H x W, got shape {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"instance masks must be N x H x W or N x 1 x H x W, got shape {tuple(masks.shape)}")
    return masks > threshold if masks.is_floating_point() else masks.bool()


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """COCO run-length encodings (JSON-ready, counts as str) of boolean masks N x H x W."""
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    rles = mask_utils.encode(fortran)
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def _xyxy_to_xywh(boxes: torch.Tensor) -> list[list[float]]:
    boxes = boxes.detach().double().cpu()
    return [[float(x0), float(y0), float(x1 - x0), float(y1 - y0)] for x0, y0, x1, y1 in boxes.tolist()]


def coco_results(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """COCO results records (the list a results JSON holds), one per predicted instance.

    Each record: image_id, category_id (the label), score, segmentation (RLE with str counts),
    bbox (XYWH; from "boxes" when given, else the mask's bounding box).
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"got {len(predictions)} predictions for {len(image_ids)} image ids")
    records = []
    for prediction, image_id in zip(predictions, image_ids):
        masks = _binary_masks(prediction["masks"], mask_threshold)
        rles = encode_masks(masks)
        labels = prediction["labels"].tolist()
        scores = prediction["scores"].tolist()
        if not len(rles) == len(labels) == len(scores):
            raise ValueError(f"image {image_id}: masks, labels and scores have different lengths")
        if "boxes" in prediction:
            boxes = _xyxy_to_xywh(prediction["boxes"])
        else:
            boxes = [list(map(float, box)) for box in mask_utils.toBbox(rles)] if rles else []
        for rle, label, score, box in zip(rles, labels, scores, boxes):
            records.append(
                {"image_id": int(image_id), "category_id": int(label), "score": float(score), "segmentation": rle, "bbox": box}
            )
    return records


def save_coco_results(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write COCO results records (from `coco_results`) as a JSON file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(records)))
    return path


class BoundaryCOCOeval(COCOeval):
    """COCOeval whose match quality is min(mask IoU, boundary IoU) (Cheng et al. 2021, sec. 5).

    Every annotation and detection must carry a "boundary" RLE: its mask's inner boundary band.
    Boundary IoU is the IoU of those bands, so pycocotools' own RLE IoU computes it.
    """

    def computeIoU(self, imgId: int, catId: int):
        mask_iou = super().computeIoU(imgId, catId)
        if len(mask_iou) == 0:
            return mask_iou
        p = self.params
        gt = self._gts[imgId, catId] if p.useCats else [g for c in p.catIds for g in self._gts[imgId, c]]
        dt = self._dts[imgId, catId] if p.useCats else [d for c in p.catIds for d in self._dts[imgId, c]]
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")  # COCOeval's own ordering
        dt = [dt[i] for i in order][: p.maxDets[-1]]
        iscrowd = [int(g["iscrowd"]) for g in gt]
        boundary = mask_utils.iou([d["boundary"] for d in dt], [g["boundary"] for g in gt], iscrowd)
        return np.minimum(mask_iou, boundary)


def _coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _run(
    evaluator_class: type[COCOeval],
    gt: COCO,
    dt: COCO,
    max_detections: int,
    *,
    iou_type: str = "segm",
    oks_sigmas: np.ndarray | None = None,
) -> COCOeval:
    evaluation = evaluator_class(gt, dt, iouType=iou_type)
    # COCO's own maxDets layouts: 1 / 10 / N for masks and boxes, a single N for keypoints.
    max_dets = [max_detections] if iou_type == "keypoints" else [1, 10, max_detections]
    evaluation.params.maxDets = max_dets
    if oks_sigmas is not None:
        evaluation.params.kpt_oks_sigmas = oks_sigmas
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        evaluation.evaluate()
        evaluation.accumulate()
        if iou_type == "keypoints":
            # summarize() reads the keypoint figures at maxDets == 20, written into pycocotools;
            # accumulate() kept a single maxDets column, so naming it 20 lets summarize read it.
            evaluation.params.maxDets = [20]
        evaluation.summarize()
    evaluation.params.maxDets = max_dets
    return evaluation


def _nan_if_missing(value: float) -> float:
    return float("nan") if value < 0 else float(value)  # COCOeval writes -1 for "no ground truth"


def _figures(evaluation: COCOeval, stat_names: Sequence[str], names: Mapping[int, str]) -> dict[str, Any]:
    """COCOeval's summary as named floats (NaN for its -1) and ap_per_class (name -> AP)."""
    results: dict[str, Any] = {name: _nan_if_missing(v) for name, v in zip(stat_names, evaluation.stats)}
    # precision[T, R, K, area=all, maxDets=last]; -1 marks categories without ground truth.
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    results["ap_per_class"] = {}
    for index, category_id in enumerate(evaluation.params.catIds):
        values = precision[:, :, index]
        if (values > -1).any():
            results["ap_per_class"][names[category_id]] = float(values[values > -1].mean())
    return results


def _category_names(categories: int | Sequence[str] | Mapping[int, str] | None) -> dict[int, str] | None:
    """Label -> name from an int K (labels 0..K-1), a sequence of names or a mapping; None stays None."""
    if categories is None:
        return None
    if isinstance(categories, int):
        categories = {i: str(i) for i in range(categories)}
    elif not isinstance(categories, Mapping):
        categories = dict(enumerate(categories))
    return {int(k): str(v) for k, v in categories.items()}


def _categories(known: Mapping[int, str] | None, annotations: Sequence[Mapping[str, Any]]) -> tuple[list[dict], dict[int, str]]:
    """COCO category entries and label -> name for the known names plus every label seen."""
    names = dict(known) if known is not None else {}
    for annotation in annotations:
        names.setdefault(annotation["category_id"], str(annotation["category_id"]))
    names = dict(sorted(names.items()))
    return [{"id": i, "name": n} for i, n in names.items()], names


class COCOMaskEvaluator:
    """Streaming COCO mask AP / AR and boundary AP for instance segmentation.

    categories: None (the labels seen in targets and predictions), an int K (labels 0..K-1),
    a sequence of names (label i is names[i]) or a mapping label -> name. Categories with no
    ground truth are left out of the means, as COCOeval does, so a background entry is harmless.

    compute() returns floats: ap (AP@[.5:.95]), ap50, ap75, aps, apm, apl, ar1, ar10, ar
    (AR at `max_detections`), ars, arm, arl, boundary_ap, boundary_ap50, boundary_ap75, and
    ap_per_class (name -> mask AP). Values COCOeval cannot define (e.g. APs without small
    objects) are NaN.
    """

    def __init__(
        self,
        categories: int | Sequence[str] | Mapping[int, str] | None = None,
        *,
        mask_threshold: float = 0.5,
        dilation_ratio: float = 0.02,
        max_detections: int = 100,
        boundary: bool = True,
    ) -> None:
        self.categories = _category_names(categories)
        self.mask_threshold = mask_threshold
        self.dilation_ratio = dilation_ratio
        self.max_detections = max_detections
        self.boundary = boundary
        self.reset()

    def reset(self) -> None:
        self._images: list[dict[str, Any]] = []

    def _encode(self, masks: torch.Tensor) -> tuple[list[dict], list[dict]]:
        rles = encode_masks(masks)
        bands = encode_masks(mask_to_boundary(masks, self.dilation_ratio)) if self.boundary and len(rles) else [{}] * len(rles)
        return rles, bands

    @torch.no_grad()
    def update(self, predictions: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Add one batch: lists of per-image prediction and target dicts (torchvision convention)."""
        if len(predictions) != len(targets):
            raise ValueError(f"got {len(predictions)} predictions for {len(targets)} targets")
        for prediction, target in zip(predictions, targets):
            gt_masks = _binary_masks(target["masks"], 0.5)
            dt_masks = _binary_masks(prediction["masks"], self.mask_threshold)
            if gt_masks.shape[-2:] != dt_masks.shape[-2:] and len(gt_masks) and len(dt_masks):
                raise ValueError(f"predicted masks {tuple(dt_masks.shape[-2:])} and target masks {tuple(gt_masks.shape[-2:])} differ in size")
            height, width = (gt_masks if len(gt_masks) else dt_masks).shape[-2:]
            gt_rles, gt_bands = self._encode(gt_masks)
            dt_rles, dt_bands = self._encode(dt_masks)
            iscrowd = target.get("iscrowd", torch.zeros(len(gt_rles), dtype=torch.int64)).tolist()
            scores = prediction["scores"].tolist()
            dt_labels = prediction["labels"].tolist()
            if not len(dt_rles) == len(dt_labels) == len(scores):
                raise ValueError("prediction masks, labels and scores have different lengths")
            self._images.append(
                {
                    "height": int(height),
                    "width": int(width),
                    "gt": list(zip(gt_rles, gt_bands, target["labels"].tolist(), iscrowd)),
                    "dt": list(zip(dt_rles, dt_bands, dt_labels, scores)),
                }
            )

    def _datasets(self, images: list[dict[str, Any]]) -> tuple[COCO, COCO, dict[int, str]]:
        image_entries, gt_annotations, dt_annotations = [], [], []
        for image_id, image in enumerate(images, start=1):
            image_entries.append({"id": image_id, "height": image["height"], "width": image["width"]})
            for rle, band, label, crowd in image["gt"]:
                gt_annotations.append(self._annotation(len(gt_annotations) + 1, image_id, rle, band, label, iscrowd=int(crowd)))
            for rle, band, label, score in image["dt"]:
                record = self._annotation(len(dt_annotations) + 1, image_id, rle, band, label, iscrowd=0)
                record["score"] = float(score)
                dt_annotations.append(record)
        categories, names = _categories(self.categories, gt_annotations + dt_annotations)
        return _coco(image_entries, categories, gt_annotations), _coco(image_entries, categories, dt_annotations), names

    @staticmethod
    def _annotation(annotation_id: int, image_id: int, rle: dict, band: dict, label: int, *, iscrowd: int) -> dict:
        return {
            "id": annotation_id,
            "image_id": image_id,
            "category_id": int(label),
            "segmentation": rle,
            "boundary": band,
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": iscrowd,
        }

    def compute(self) -> dict[str, Any]:
        images = gather_objects(self._images)
        gt, dt, names = self._datasets(images)
        results: dict[str, Any] = {name: float("nan") for name in _STAT_NAMES}
        results.update(boundary_ap=float("nan"), boundary_ap50=float("nan"), boundary_ap75=float("nan"), ap_per_class={})
        if not gt.dataset["annotations"]:
            return results  # nothing to detect: every figure is undefined
        results.update(_figures(_run(COCOeval, gt, dt, self.max_detections), _STAT_NAMES, names))
        if self.boundary:
            boundary_eval = _run(BoundaryCOCOeval, gt, dt, self.max_detections)
            results["boundary_ap"], results["boundary_ap50"], results["boundary_ap75"] = (
                _nan_if_missing(v) for v in boundary_eval.stats[:3]
            )
        return results

    def coco_results(self) -> list[dict[str, Any]]:
        """The accumulated detections as COCO results records (image ids 1, 2, ... in update order)."""
        _, dt, _ = self._datasets(self._images)
        keys = ("image_id", "category_id", "score", "segmentation", "bbox")
        return [{k: a[k] for k in keys} for a in dt.dataset["annotations"]]
