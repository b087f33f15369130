"""Evaluation: stream a model's predictions over a data set into the confusion matrix."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from seglab.metrics.confusion import ConfusionMatrix

__all__ = ["Normalize", "evaluate", "logits_of"]


class Normalize(nn.Module):
    """(x - mean) / std on a whole batch, on the batch's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        channels = images.shape[1]
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        if mean.shape[1] != channels:  # grayscale or extra channels: reuse the mean statistic
            mean, std = mean.mean().expand(1, channels, 1, 1), std.mean().expand(1, channels, 1, 1)
        return (images - mean) / std


def logits_of(output: torch.Tensor | dict[str, Any]) -> torch.Tensor:
    """Models with deep supervision return {"out": logits, "aux": [...]}; take the main output."""
    return output["out"] if isinstance(output, dict) else output


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_classes: int,
    ignore_index: int,
    normalize: Normalize,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Confusion-matrix metrics (and the mean loss when `loss_fn` is given) over `loader`."""
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    loss_sum, pixels = 0.0, 0
    for batch in loader:
        images = normalize(batch["image"].to(device, non_blocking=True))
        target = batch["mask"].to(device, non_blocking=True)
        logits = logits_of(model(images))
        matrix.update(logits, target)
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, target)) * images.shape[0]
            pixels += images.shape[0]
        if on_batch is not None:
            on_batch()
    model.train(was_training)
    results = matrix.compute()
    if loss_fn is not None and pixels:
        results["loss"] = loss_sum / pixels
    return results
