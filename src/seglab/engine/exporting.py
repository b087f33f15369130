"""Export a trained checkpoint for deployment, normalisation included.

The exported graph takes what a user has, a float image batch N x C x H x W in [0, 1], and
returns logits N x K x H x W: the checkpoint's mean/std normalisation is folded in, so no
deployment code has to know it. Tracing and writing are seglab.export's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from seglab.engine.evaluator import Normalize, logits_of
from seglab.export import export_onnx, export_torchscript

__all__ = ["NormalizedModel", "export_checkpoint"]


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
    if config.get("task", "semantic") != "semantic":
        raise ValueError(f"export handles semantic models; this checkpoint's task is {config.get('task')!r}")
    wrapped = NormalizedModel(model.cpu().eval(), config["mean"], config["std"]).eval()
    size = image_size or config.get("image_size") or 256
    in_channels = int(config.get("kwargs", {}).get("in_channels", 3))
    if format == "onnx":
        return export_onnx(wrapped, path, image_size=size, in_channels=in_channels, dynamic=dynamic, dynamo=not legacy_onnx)
    return export_torchscript(wrapped, path, image_size=size, in_channels=in_channels)
