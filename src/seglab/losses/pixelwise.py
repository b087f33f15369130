"""Per-pixel losses: cross-entropy, binary cross-entropy and focal loss.

Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017):
    FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t),
where p_t is the probability given to the true class; gamma = 0 and no alpha is plain CE.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seglab.losses._inputs import binary_view, check_mode, masked_mean, pixel_major_softmax, valid_mask
from seglab.ops.cross_entropy import native_cross_entropy, takes_native_cross_entropy

__all__ = ["BCELoss", "CrossEntropyLoss", "FocalLoss", "pixel_cross_entropy"]


def _weights(class_weights: Sequence[float] | torch.Tensor | None) -> torch.Tensor | None:
    return None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, **options) -> torch.Tensor:
    """F.cross_entropy(logits, target, reduction="none", **options) per pixel (N x H x W), also
    fast for channels-last logits with many classes: PyTorch's log-softmax over dim 1 first
    copies those into NCHW and then reduces across strided channels (a x4-upsampled 21-class
    512 x 512 batch of 4: 240 ms forward + backward with the upsampling), while as a (pixels x
    classes) matrix the classes of a pixel are contiguous (94 ms). With few classes (under 16)
    the channel-plane kernel stays faster."""
    channels_last = logits.dim() == 4 and not logits.is_contiguous() and logits.is_contiguous(memory_format=torch.channels_last)
    if not (channels_last and pixel_major_softmax(logits.shape[1])):
        return F.cross_entropy(logits, target, reduction="none", **options)
    n, k, h, w = logits.shape
    per_pixel = F.cross_entropy(logits.permute(0, 2, 3, 1).reshape(-1, k), target.reshape(-1), reduction="none", **options)
    return per_pixel.view(n, h, w)


class CrossEntropyLoss(nn.Module):
    """Multiclass cross-entropy with class weights, ignore_index and label smoothing.

    Identical to torch.nn.functional.cross_entropy with reduction="mean" (the weighted mean,
    divided by the summed weights of the counted pixels; label smoothing as Szegedy et al. 2016
    mixes the one-hot target with the uniform distribution), except that a batch whose pixels
    are all ignored gives 0 instead of NaN, and that it computes in float32 whatever the
    logits' dtype (`upcasts_itself`: the trainer hands it bf16 logits as they are).

    On the CPU, channels-last (or pixels x classes) logits without label smoothing take
    `seglab.ops.cross_entropy`'s native kernel: loss and gradient in one pass, 3x faster than
    PyTorch's six passes (`takes_native_cross_entropy` says when).
    """

    upcasts_itself = True

    def __init__(
        self,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        ignore_index: int | None = 255,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.register_buffer("class_weights", _weights(class_weights), persistent=False)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ignore = -100 if self.ignore_index is None else self.ignore_index
        if takes_native_cross_entropy(logits, target, self.label_smoothing):
            return native_cross_entropy(logits, target, self.class_weights, ignore)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        weight = None if self.class_weights is None else self.class_weights.to(logits.dtype)
        per_pixel = pixel_cross_entropy(
            logits, target.long(), weight=weight, ignore_index=ignore, label_smoothing=self.label_smoothing
        )
        valid = valid_mask(target, self.ignore_index)
        if weight is None:
            return masked_mean(per_pixel, valid)
        counted = weight[target.masked_fill(~valid, 0).long()] * valid
        return per_pixel.sum() / counted.sum().clamp(min=torch.finfo(logits.dtype).tiny)


class BCELoss(nn.Module):
    """Binary cross-entropy on logits for the binary and multilabel modes.

    pos_weight multiplies the positive term (as in torch's BCEWithLogitsLoss); label smoothing
    moves targets to y (1 - eps) + eps / 2. Mean over the entries that are not ignored.
    """

    def __init__(
        self,
        mode: str = "binary",
        ignore_index: int | None = 255,
        pos_weight: float | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if check_mode(mode) == "multiclass":
            raise ValueError("BCE is for the binary and multilabel modes; use 'ce' for multiclass")
        self.mode = mode
        self.ignore_index = ignore_index
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32).view(-1, 1), persistent=False)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = binary_view(logits, target, self.mode)
        valid = valid_mask(target, self.ignore_index)
        soft_target = target.masked_fill(~valid, 0).to(logits.dtype)
        soft_target = soft_target * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        per_entry = F.binary_cross_entropy_with_logits(
            logits, soft_target, pos_weight=None if self.pos_weight is None else self.pos_weight.to(logits.dtype), reduction="none"
        )
        return masked_mean(per_entry, valid)


class FocalLoss(nn.Module):
    """Focal loss, mean over the pixels (entries) that are not ignored.

    multiclass: softmax focal loss, p_t = softmax probability of the true class, alpha_t =
    class_weights[t] when given (else 1). binary / multilabel: sigmoid focal loss of Lin et al.,
    alpha_t = alpha for positives and 1 - alpha for negatives (alpha=None: no weighting).
    """

    def __init__(
        self,
        mode: str = "multiclass",
        gamma: float = 2.0,
        alpha: float | None = None,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        ignore_index: int | None = 255,
    ) -> None:
        super().__init__()
        self.mode = check_mode(mode)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.alpha = alpha
        self.register_buffer("class_weights", _weights(class_weights), persistent=False)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.mode == "multiclass":
            valid = valid_mask(target, self.ignore_index)
            labels = target.masked_fill(~valid, 0).long()
            log_pt = -pixel_cross_entropy(logits, labels)
            loss = -((1 - log_pt.exp()) ** self.gamma) * log_pt
            if self.class_weights is not None:
                loss = loss * self.class_weights.to(logits.dtype)[labels]
            return masked_mean(loss, valid)
        logits, target = binary_view(logits, target, self.mode)
        valid = valid_mask(target, self.ignore_index)
        y = target.masked_fill(~valid, 0).to(logits.dtype)
        log_pt = -F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        loss = -((1 - log_pt.exp()) ** self.gamma) * log_pt
        if self.alpha is not None:
            loss = loss * (self.alpha * y + (1 - self.alpha) * (1 - y))
        return masked_mean(loss, valid)
