"""Keypoint R-CNN (He et al. 2017, Mask R-CNN, section 5) end to end: training, COCO keypoint
evaluation and prediction.

Pose estimation in Mask R-CNN's frame: every detected object gets one 56 x 56 heat map per
keypoint, trained as a softmax over the map's pixels against the one labelled pixel. Training
runs through instance training's loop (:class:`~seglab.engine.instance.InstanceTrainer`: the same
run directory, options, resume and checkpoints); what is the task's own:

- the data (:mod:`seglab.data.keypoints`): the built-in synthetic stick figures or a COCO
  keypoint file, targets with ``keypoints`` (N x K x 3: x, y, visibility) and ``area``;
  training augmentation flips with the left/right keypoints swapped;
- the validation metric: COCO keypoint AP, pycocotools' object keypoint similarity (OKS) with
  the data set's per-keypoint constants (COCO's own for its 17 person keypoints);
- the pictures and files: skeletons drawn on the images, ``<stem>_keypoints.json`` per
  predicted image and ``results.json`` in COCO's keypoint results format.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from seglab.data.keypoints import keypoint_transforms, open_keypoint_dataset
from seglab.engine.instance import INSTANCE_DEFAULTS, InstanceTrainer, eval_instance, metrics_table, train_instance
from seglab.engine.instance_predictor import (
    InstancePredictor,
    _distinct_colour,
    class_name,
    label_box,
    predict_instance,
    sorted_detections,
)
from seglab.files import atomic_write_text
from seglab.metrics import COCOKeypointEvaluator, keypoint_results
from seglab.viz import to_uint8_image

__all__ = [
    "KEYPOINT_DEFAULTS",
    "KeypointPredictor",
    "KeypointTrainer",
    "eval_keypoints",
    "evaluate_keypoints",
    "keypoint_metrics_table",
    "keypoint_overlay",
    "predict_keypoints",
    "train_keypoints",
]

# What `seglab train --task keypoint` uses where the command line and config say nothing: the
# synthetic stick figures at 128 x 128 and heads narrowed for them. The paper's keypoint head
# (eight 3x3 convs of 512 channels on 14 x 14 RoIs) costs about 7 GFLOPs per RoI, tens of
# seconds per CPU step; 128 channels cost a sixteenth of that.
KEYPOINT_DEFAULTS: dict[str, Any] = {
    **INSTANCE_DEFAULTS,
    "task": "keypoint",
    "model": "keypoint_rcnn",
    "model_kwargs": {"fpn_channels": 128, "head_channels": 128, "box_head_width": 512, "rois_per_image": 64,
                     "detections_per_image": 20},
}

# pycocotools' keypoint summary, in its order (no small objects: COCO does not score their poses)
_METRIC_KEYS = ("ap", "ap50", "ap75", "apm", "apl", "ar", "ar50", "ar75", "arm", "arl")
_TABLE_COLUMNS = {"ap": "keypoint AP", "ap50": "AP50", "ap75": "AP75", "apm": "APm", "apl": "APl", "ar": "AR", "ar50": "AR50"}


class KeypointTrainer(InstanceTrainer):
    """Trains Keypoint R-CNN (`keypoint_rcnn`) on keypoint data, keeping the best checkpoint by
    COCO keypoint AP; everything else as :class:`InstanceTrainer`."""

    task = "keypoint"
    metric_keys = _METRIC_KEYS
    score_name = "keypoint AP"
    table_columns = _TABLE_COLUMNS
    headline_keys = ("ap", "ap50", "ar")

    @staticmethod
    def open_dataset(source: str, split: str, *, transforms: Any = None, format: str | None = None,
                     **options: Any) -> torch.utils.data.Dataset:
        if format is not None and (format != "coco" or source == "synthetic"):
            where = "the built-in synthetic set has no layout to name" if source == "synthetic" else "keypoint data is a COCO file"
            raise ValueError(f"--format {format}: {where}; leave --format out")
        return open_keypoint_dataset(source, split, transforms=transforms, **options)

    @staticmethod
    def evaluator(described: dict[str, Any]) -> Any:
        return COCOKeypointEvaluator(list(described["sigmas"]), list(described["classes"]))

    records_of = staticmethod(keypoint_results)

    def _data_options(self, train: bool) -> dict[str, Any]:
        options = super()._data_options(train)
        if "num_classes" in options:
            raise ValueError("--num-classes: the synthetic keypoint set has one class of object (figure)")
        return options

    def _open_training_data(self, augment: dict[str, Any] | None, crop: int | None) -> torch.utils.data.Dataset:
        if augment is not None and augment.get("copy_paste"):
            raise ValueError("augment copy_paste pastes objects by their masks; keypoint data has no masks")
        dataset = self._open_data("train", None)
        if augment is not None:  # the flip's left/right swap is the data set's, known once it is open
            dataset.transforms = keypoint_transforms(True, dataset.flip_pairs, crop, scale=augment["scale"])
        return dataset

    def _model_kwargs_from_data(self) -> dict[str, Any]:
        count = len(self.train_set.keypoint_names)
        given = self.config.model_kwargs.get("num_keypoints")
        if given is not None and int(given) != count:
            raise ValueError(f"--model-option num_keypoints={given}: the data set's objects have {count} keypoints")
        return {"num_keypoints": count}

    def _data_description(self) -> dict[str, Any]:
        data = self.train_set
        return {"keypoint_names": list(data.keypoint_names), "skeleton": [list(limb) for limb in data.skeleton],
                "sigmas": [float(s) for s in data.sigmas]}

    def _overlay(self, image: torch.Tensor, detections: dict[str, torch.Tensor]) -> np.ndarray:
        return keypoint_overlay(image, detections, self.train_set.classes, self.train_set.skeleton)


@torch.inference_mode()
def evaluate_keypoints(
    model: nn.Module,
    loader: DataLoader,
    classes: Sequence[str],
    sigmas: Sequence[float],
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    results_json: str | Path | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
    """COCO keypoint AP / AP50 / AP75 / APm / APl and AR of `model` on `loader` (OKS with the
    per-keypoint constants `sigmas`); ``images_per_second`` and `results_json` as
    :func:`~seglab.engine.instance.evaluate_instances`."""
    return KeypointTrainer.score(model, loader, {"classes": list(classes), "sigmas": list(sigmas)}, device, progress,
                                 results_json, autocast)


def keypoint_metrics_table(results: dict[str, Any], title: str = "Validation") -> Table:
    """COCO keypoint AP figures, one row, plus per-class keypoint AP."""
    return metrics_table(results, _TABLE_COLUMNS, title)


def keypoint_overlay(image: torch.Tensor, prediction: dict[str, torch.Tensor], classes: Sequence[str],
                     skeleton: Sequence[Sequence[int]], score_threshold: float = 0.5) -> np.ndarray:
    """Each object's box, limbs and keypoints in its own colour, labelled "class score";
    keypoints of visibility 0 (ground truth: not labelled) are not drawn."""
    detections = sorted_detections(prediction, score_threshold)
    canvas = Image.fromarray(to_uint8_image(image))
    draw = ImageDraw.Draw(canvas)
    radius = max(1.0, min(canvas.size) / 100)
    for index, (box, label, score, points) in enumerate(zip(detections["boxes"].tolist(), detections["labels"].tolist(),
                                                            detections["scores"].tolist(), detections["keypoints"].tolist())):
        colour = _distinct_colour(index)
        label_box(draw, box, f"{class_name(classes, label)} {score:.2f}", colour)
        for start, end in skeleton:
            if points[start][2] > 0 and points[end][2] > 0:
                draw.line([tuple(points[start][:2]), tuple(points[end][:2])], fill=colour, width=max(1, round(radius)))
        for x, y, visibility in points:
            if visibility > 0:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 255, 255), outline=colour)
    return np.asarray(canvas)


class KeypointPredictor(InstancePredictor):
    """:class:`InstancePredictor` for Keypoint R-CNN checkpoints. Per image it writes
    ``<stem>_keypoints.json``: the detections at or above the score threshold, highest score
    first, each with its class, score, box (XYXY pixels) and one [x, y, score] per keypoint
    (the score the heat map's peak, a logit), under the checkpoint's keypoint names and skeleton;
    for the job, ``results.json`` in COCO's keypoint results format (every detection) and
    ``images.json``."""

    task = "keypoint"
    files_words = "keypoints (<stem>_keypoints.json)"
    counted_suffix = "_keypoints.json"

    records_of = staticmethod(keypoint_results)

    def _image_files(self, out_dir: Path, stem: str, image: torch.Tensor, found: dict[str, torch.Tensor]) -> list[Path]:
        shown = sorted_detections(found, self.score_threshold)
        scores = shown.get("keypoints_scores", torch.zeros(shown["keypoints"].shape[:2]))
        detections = [
            {
                "label": int(label),
                "class": class_name(self.classes, label),
                "score": round(float(score), 4),
                "box": [round(v, 2) for v in box],
                "keypoints": [[round(x, 2), round(y, 2), round(s, 3)] for (x, y, _), s in zip(points, point_scores)],
            }
            for label, score, box, points, point_scores in zip(shown["labels"].tolist(), shown["scores"].tolist(),
                                                               shown["boxes"].tolist(), shown["keypoints"].tolist(),
                                                               scores.tolist())
        ]
        record = {"keypoint_names": self.config.get("keypoint_names", []), "skeleton": self.config.get("skeleton", []),
                  "detections": detections}
        target = out_dir / f"{stem}_keypoints.json"
        atomic_write_text(target, json.dumps(record, indent=1))
        return [target]

    def _overlay(self, image: torch.Tensor, found: dict[str, torch.Tensor]) -> np.ndarray:
        return keypoint_overlay(image, found, self.classes, self.config.get("skeleton", []), self.score_threshold)


# --- the command line's entry points ----------------------------------------------------------


def train_keypoints(values: dict[str, Any], console: Console, resume: str | Path | None = None) -> int:
    """`seglab train --task keypoint`: :data:`KEYPOINT_DEFAULTS`, overridden by config file and flags."""
    return train_instance(values, console, resume, trainer_class=KeypointTrainer, defaults=KEYPOINT_DEFAULTS)


def eval_keypoints(model: nn.Module, config: dict[str, Any], args: Any, console: Console) -> int:
    """`seglab eval` of a keypoint checkpoint: the COCO keypoint AP table, optionally JSON files."""
    return eval_instance(model, config, args, console, trainer_class=KeypointTrainer)


def predict_keypoints(args: Any, console: Console, unreadable: list[tuple[Path, str]] | None = None) -> None:
    """`seglab predict` with a keypoint checkpoint: :class:`KeypointPredictor`'s files in --out."""
    predict_instance(args, console, unreadable, predictor_class=KeypointPredictor)
