"""Lovasz-softmax and Lovasz-hinge losses (Berman, Rannen Triki, Blaschko, CVPR 2018).

The Jaccard loss of a set of mispredicted pixels is submodular; its Lovasz extension is a
convex, piecewise-linear surrogate evaluated on a vector of pixel errors m:

    loss(m) = sum_i m_(i) g_i,   m sorted in decreasing order,
    g_i = J(first i pixels wrong) - J(first i-1 pixels wrong)   (Algorithm 1 of the paper),

with J(.) = 1 - |gt - errors| / |gt + errors| the Jaccard loss. Lovasz-softmax uses the
errors m_i = |y_i - p_i| of each class's probability and averages over classes (by default the
classes present in the ground truth, as the paper does); Lovasz-hinge uses the hinge errors
max(0, 1 - s_i f_i) of binary logits f with signs s = 2y - 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seglab.losses._inputs import binary_view, check_mode, valid_mask

__all__ = ["LovaszHingeLoss", "LovaszSoftmaxLoss", "lovasz_grad"]


def lovasz_grad(sorted_foreground: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss, for 0/1 labels in error order."""
    total = sorted_foreground.sum()
    intersection = total - sorted_foreground.cumsum(0)
    union = total + (1 - sorted_foreground).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def _lovasz_softmax_flat(probs: torch.Tensor, labels: torch.Tensor, only_present: bool) -> torch.Tensor:
    """probs M x K (valid pixels only), labels M; mean of the per-class Lovasz extensions."""
    losses = []
    for c in range(probs.shape[1]):
        foreground = (labels == c).to(probs.dtype)
        if only_present and foreground.sum() == 0:
            continue
        errors = (foreground - probs[:, c]).abs()
        errors_sorted, order = errors.sort(descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(foreground[order])))
    return torch.stack(losses).mean() if losses else probs.sum() * 0


def _lovasz_hinge_flat(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits M, labels M in {0, 1} (valid entries only)."""
    if logits.numel() == 0:
        return logits.sum() * 0
    signs = 2 * labels.to(logits.dtype) - 1
    errors = 1 - logits * signs
    errors_sorted, order = errors.sort(descending=True)
    return torch.dot(F.relu(errors_sorted), lovasz_grad(labels.to(logits.dtype)[order]))


class LovaszSoftmaxLoss(nn.Module):
    """Lovasz-softmax for the multiclass mode: logits N x K x H x W, target N x H x W.

    per_image=False (the paper's default for softmax) pools every pixel of the batch;
    per_image=True averages per-image losses. classes="present" averages over classes that
    occur in the ground truth, "all" over all K.
    """

    def __init__(self, per_image: bool = False, classes: str = "present", ignore_index: int | None = 255) -> None:
        super().__init__()
        if classes not in ("present", "all"):
            raise ValueError(f"lovasz classes must be 'present' or 'all', got {classes!r}")
        self.per_image = per_image
        self.only_present = classes == "present"
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != target.dim() + 1:
            raise ValueError(f"lovasz-softmax needs logits N x K x ... and target N x ..., got {tuple(logits.shape)} and {tuple(target.shape)}")
        probs = logits.softmax(1).flatten(2).transpose(1, 2)  # N x M x K
        labels = target.flatten(1)
        valid = valid_mask(labels, self.ignore_index)
        if self.per_image:
            losses = [_lovasz_softmax_flat(p[v], l[v], self.only_present) for p, l, v in zip(probs, labels, valid)]
            return torch.stack(losses).mean()
        return _lovasz_softmax_flat(probs[valid], labels[valid], self.only_present)


class LovaszHingeLoss(nn.Module):
    """Lovasz-hinge for the binary and multilabel modes (one problem per image and label).

    per_image=True (the paper's default for the hinge) averages per-image losses; False pools
    the batch. In the multilabel mode each label is its own binary problem; losses are averaged.
    """

    def __init__(self, mode: str = "binary", per_image: bool = True, ignore_index: int | None = 255) -> None:
        super().__init__()
        if check_mode(mode) == "multiclass":
            raise ValueError("lovasz-hinge is for the binary and multilabel modes; use lovasz-softmax for multiclass")
        self.mode = mode
        self.per_image = per_image
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = binary_view(logits, target, self.mode)  # N x C x S
        valid = valid_mask(target, self.ignore_index)
        if not self.per_image:
            logits, target, valid = (t.transpose(0, 1).flatten(1).unsqueeze(0) for t in (logits, target, valid))
        losses = [
            _lovasz_hinge_flat(logits[n, c][valid[n, c]], target[n, c][valid[n, c]])
            for n in range(logits.shape[0])
            for c in range(logits.shape[1])
        ]
        return torch.stack(losses).mean()
