"""Export a trained checkpoint for deployment, normalisation included.

The exported graph takes what a user has, a float image batch N x C x H x W in [0, 1], and
returns logits N x K x H x W: the checkpoint's mean/std normalisation is folded in, so no
deployment code has to know it. Tracing and writing are seglab.export's.

An instance model (ONNX only) takes one image, 1 x C x H x W in [0, 1] (the models normalise
internally), and returns its detections, as many as it found: ``boxes`` (N x 4, XYXY pixels),
``labels`` (N, 1..K), ``scores`` (N, above the model's own threshold, highest first for YOLACT)
and ``masks`` (N x 1 x H x W probabilities). YOLACT goes through ``torch.export``, which keeps
the detection count symbolic (its Fast NMS has no branch on it); torchvision's Mask R-CNN
through the TorchScript-based exporter, for which torchvision writes its branches (torch.export
stops at them). Keypoint R-CNN goes the same way and returns ``keypoints`` (N x K x 3: x, y, 1)
and ``keypoints_scores`` (N x K) in place of masks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from seglab.engine.evaluator import Normalize, logits_of
from seglab.export import export_onnx, export_torchscript

__all__ = ["DETECTIONS", "KEYPOINT_DETECTIONS", "InstanceDetections", "NormalizedModel", "export_checkpoint"]


MIN_INSTANCE_EXAMPLE = 256  # pixels a side of the image an instance model is exported with
DETECTIONS = {"boxes": {0: "detections"}, "labels": {0: "detections"}, "scores": {0: "detections"},
              "masks": {0: "detections", 2: "height", 3: "width"}}
# Keypoint R-CNN's: masks give way to keypoints (detections x K x 3: x, y, 1) and their heat-map scores
KEYPOINT_DETECTIONS = {**{name: DETECTIONS[name] for name in ("boxes", "labels", "scores")},
                       "keypoints": {0: "detections"}, "keypoints_scores": {0: "detections"}}


class InstanceDetections(nn.Module):
    """An instance model's detections of one image (1 x C x H x W) as the tuple `outputs` names
    (DETECTIONS, or KEYPOINT_DETECTIONS for Keypoint R-CNN)."""

    def __init__(self, model: nn.Module, outputs: dict[str, dict[int, str]] = DETECTIONS) -> None:
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        found = self.model([image[0]])[0]
        return tuple(found[name] for name in self.outputs)


class NormalizedModel(nn.Module):
    """model(normalize(x)), returning only the main logits."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.normalize = Normalize(mean, std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(self.normalize(images)))


def export_checkpoint(
    model: nn.Module,
    config: dict[str, Any],
    path: str | Path,
    *,
    format: str = "onnx",
    image_size: int | list[int] | None = None,
    dynamic: bool = True,
    legacy_onnx: bool = False,
) -> Path:
    """Write the checkpoint's model (with its normalisation) as ONNX or TorchScript to `path`."""
    if format not in ("onnx", "torchscript"):
        raise ValueError(f"--format must be onnx or torchscript, not {format!r}")
    size = image_size or config.get("image_size") or 256
    in_channels = int(config.get("kwargs", {}).get("in_channels", 3))
    task = config.get("task", "semantic")
    if task in ("instance", "keypoint"):
        return _export_instance(model, config, path, format=format, size=size, in_channels=in_channels, dynamic=dynamic,
                                legacy_onnx=legacy_onnx)
    if task != "semantic":
        raise ValueError(f"export handles semantic, instance and keypoint models; this checkpoint's task is {task!r}")
    wrapped = NormalizedModel(model.cpu().eval(), config["mean"], config["std"]).eval()
    if format == "onnx":
        return export_onnx(wrapped, path, image_size=size, in_channels=in_channels, dynamic=dynamic, dynamo=not legacy_onnx)
    return export_torchscript(wrapped, path, image_size=size, in_channels=in_channels)


def _export_instance(model: nn.Module, config: dict[str, Any], path: str | Path, *, format: str,
                     size: int | list[int], in_channels: int, dynamic: bool, legacy_onnx: bool) -> Path:
    """The module docstring's instance graph, by the exporter that takes the model."""
    if format != "onnx":
        raise ValueError(f"--format {format}: instance models export to onnx only (their detection count varies per image)")
    by_tracing = isinstance(model, GeneralizedRCNN)
    if legacy_onnx and not by_tracing:
        raise ValueError(f"--legacy-onnx: {config['model']} exports by torch.export only (a trace would fix its "
                         "detection count to the example image's)")
    # torch.export takes a dimension of size 1 for a constant: the example image must leave every
    # pyramid level (down to 1/128) at least 2 pixels, or the graph holds only for that size
    size = [max(side, MIN_INSTANCE_EXAMPLE) for side in ([size, size] if isinstance(size, int) else size)]
    outputs = KEYPOINT_DETECTIONS if config.get("task") == "keypoint" else DETECTIONS
    return export_onnx(InstanceDetections(model.cpu().eval(), outputs).eval(), path, image_size=size, in_channels=in_channels,
                       dynamic=dynamic, dynamo=not by_tracing, outputs=outputs, one_image=True)
