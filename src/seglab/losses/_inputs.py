"""Shape conventions shared by every loss: the three modes and ignore_index.

    multiclass  logits N x K x H x W, target N x H x W (class indices)
    binary      logits N x 1 x H x W or N x H x W, target N x H x W or N x 1 x H x W (0/1)
    multilabel  logits N x K x H x W, target N x K x H x W (0/1 per label)

Spatial dims may be any number (H x W, D x H x W, or none). Target entries equal to
`ignore_index` are masked out of every loss: they add nothing to sums nor to the pixel counts
used for means, and a batch where everything is ignored gives a loss of 0 (not NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("multiclass", "binary", "multilabel")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"loss mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def binary_view(logits: torch.Tensor, target: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of equal shape N x C x S for the binary and multilabel modes."""
    if mode == "binary":
        if logits.dim() == target.dim() + 1 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if target.dim() == logits.dim() + 1 and target.shape[1] == 1:
            target = target[:, 0]
        logits, target = logits.unsqueeze(1), target.unsqueeze(1)
    if logits.shape != target.shape:
        raise ValueError(f"{mode} loss needs logits and target of the same shape, got {tuple(logits.shape)} and {tuple(target.shape)}")
    return logits.flatten(2), target.flatten(2)


def valid_mask(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    return torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index


def probabilities_and_onehot(
    logits: torch.Tensor, target: torch.Tensor, mode: str, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities, 0/1 targets, validity) as N x C x S, C = K (multiclass/multilabel) or 1.

    Multiclass: softmax and one-hot; binary/multilabel: sigmoid per channel.
    """
    if mode == "multiclass":
        if logits.dim() != target.dim() + 1:
            raise ValueError(f"multiclass loss needs logits N x K x ... and target N x ..., got {tuple(logits.shape)} and {tuple(target.shape)}")
        num_classes = logits.shape[1]
        valid = valid_mask(target, ignore_index).flatten(1).unsqueeze(1)
        labels = target.flatten(1).masked_fill(~valid[:, 0], 0).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"target class outside 0..{num_classes - 1} (and not ignore_index={ignore_index})")
        onehot = F.one_hot(labels, num_classes).transpose(1, 2).to(logits.dtype)
        return logits.flatten(2).softmax(1), onehot, valid
    logits, target = binary_view(logits, target, mode)
    valid = valid_mask(target, ignore_index)
    return logits.sigmoid(), target.masked_fill(~valid, 0).to(logits.dtype), valid


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid entries; 0 (still attached to the graph) when none is valid."""
    values = values * valid
    return values.sum() / valid.sum().clamp(min=1)
