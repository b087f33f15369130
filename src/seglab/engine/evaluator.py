"""Evaluation: stream a model's predictions over a data set into the confusion matrix."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from seglab.engine.distributed import all_reduce_sum
from seglab.interrupts import raise_if_interrupted
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
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    crf: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Confusion-matrix metrics (and the mean loss when `loss_fn` is given) over `loader`.

    In a multi-process run each process passes its shard of the data; the confusion matrix and
    the loss are summed over processes, so every rank returns the figures of the whole set.
    """
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    loss_sum, images_seen = 0.0, 0
    for batch in loader:
        raise_if_interrupted()
        images = normalize(batch["image"].to(device, non_blocking=True))
        target = batch["mask"].to(device, non_blocking=True)
        with autocast():
            logits = logits_of(model(images))
        logits = logits.float()
        if crf is not None:  # e.g. seglab.crf.make_crf(): refine on the raw images; log-probabilities stand in for logits
            logits = crf(batch["image"].to(device), logits.softmax(dim=1)).clamp_min(1e-8).log()
        matrix.update(logits, target)
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, target)) * images.shape[0]
            images_seen += images.shape[0]
        if on_batch is not None:
            on_batch()
    model.train(was_training)
    results = matrix.compute()
    if loss_fn is not None:
        totals = all_reduce_sum(torch.tensor([loss_sum, float(images_seen)], dtype=torch.float64, device=device))
        if totals[1] > 0:
            results["loss"] = float(totals[0] / totals[1])
    return results
