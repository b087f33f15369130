"""Region-overlap losses: soft Dice, soft Jaccard, Tversky and focal Tversky.

With P the predicted probabilities and Y the one-hot targets of one class, summed over the
pixels of one image (per_image=True) or of the whole batch (per_image=False):

    Dice     1 - (2 <Y,P> + s) / (|Y| + |P| + s)               (Milletari et al., V-Net, 2016)
    Jaccard  1 - (<Y,P> + s) / (|Y| + |P| - <Y,P> + s)         (Rahman & Wang 2016)
    Tversky  1 - (TP + s) / (TP + alpha FP + beta FN + s)       (Salehi et al. 2017)
    focal Tversky  (1 - Tversky index)^gamma                    (Abraham & Khan 2019)

|.| is the L1 norm (norm="l1") or the squared L2 norm (norm="l2", V-Net's form); TP = <Y,P>,
FP = <1-Y,P>, FN = <Y,1-P>; s is the smoothing constant. The loss is the mean over classes (and
images); every class counts, and with s > 0 a class absent from the target is rewarded for a
low predicted mass instead of being 0/0. In the binary mode only the foreground is scored.
Ignored pixels are removed from P and Y before summing.

In the multiclass mode on the CPU, channels-last scores (1 to 1,024 classes) get their three sums
and the sums' gradient from one native pass each way (`seglab.ops.overlap_sums`); the formulas
above then run on the N x K sums. Half-precision scores are computed in float32 either way.
"""
from __future__ import annotations

import torch
from torch import nn

from seglab.losses._inputs import check_mode, multiclass_overlap_sums, sigmoid_probabilities_and_targets
from seglab.metrics.soft import NORMS, overlap_terms

__all__ = ["DiceLoss", "JaccardLoss", "TverskyLoss"]


class _OverlapLoss(nn.Module):
    # Computes in float32 from logits of any dtype: the native sums (CPU, multiclass) read bf16
    # logits as they are; otherwise half-precision logits are cast first (`_sums`,
    # `multiclass_overlap_sums`).
    upcasts_itself = True
    # The norm of |P| and |Y| in the loss's sums (`_NormedOverlapLoss`: its `norm`).
    sums_norm = "l1"

    def __init__(self, mode: str, smooth: float, per_image: bool, ignore_index: int | None, eps: float = 1e-7) -> None:
        super().__init__()
        self.mode = check_mode(mode)
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.smooth = smooth
        self.per_image = per_image
        self.ignore_index = ignore_index
        self.eps = eps  # only guards 0/0 when smooth = 0

    def _sums(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """<Y,P>, |P|, |Y| per class (and image, with per_image)."""
        if self.mode == "multiclass":
            return multiclass_overlap_sums(logits, target, self.ignore_index, self.sums_norm, self.per_image)
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        probs, targets, valid = sigmoid_probabilities_and_targets(logits, target, self.mode, self.ignore_index)
        return overlap_terms(probs * valid, targets * valid, self.sums_norm, (2,) if self.per_image else (0, 2))

    def loss_from_sums(self, intersection: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
        """The loss from <Y,P>, |P| and |Y| (as `_sums` returns them)."""
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_from_sums(*self._sums(logits, target))


class _NormedOverlapLoss(_OverlapLoss):
    """1 - a soft overlap score built from <Y,P>, |P| and |Y| in the L1 or squared-L2 norm."""

    name = ""

    def __init__(
        self,
        mode: str = "multiclass",
        norm: str = "l1",
        smooth: float = 1.0,
        per_image: bool = False,
        ignore_index: int | None = 255,
    ) -> None:
        super().__init__(mode, smooth, per_image, ignore_index)
        if norm not in NORMS:
            raise ValueError(f"{self.name} norm must be 'l1' or 'l2', got {norm!r}")
        self.norm = norm

    @property
    def sums_norm(self) -> str:  # type: ignore[override]
        return self.norm

    def _score(self, intersection: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_from_sums(self, intersection: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
        return 1 - self._score(intersection, predicted, actual).mean()


class DiceLoss(_NormedOverlapLoss):
    """1 - soft Dice, L1 or squared-L2 denominators (see module docstring)."""

    name = "dice"

    def _score(self, intersection: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (2 * intersection + self.smooth) / (p + y + self.smooth).clamp(min=self.eps)


class JaccardLoss(_NormedOverlapLoss):
    """1 - soft Jaccard (IoU), L1 or squared-L2 norms (see module docstring)."""

    name = "jaccard"

    def _score(self, intersection: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (intersection + self.smooth) / (p + y - intersection + self.smooth).clamp(min=self.eps)


class TverskyLoss(_OverlapLoss):
    """Tversky loss; alpha weighs false positives, beta false negatives (alpha = beta = 0.5 is
    Dice). gamma != 1 gives the focal Tversky loss, mean over classes of (1 - TI_c)^gamma;
    Abraham & Khan use gamma = 0.75 (their 1/gamma with gamma = 4/3)."""

    def __init__(
        self,
        mode: str = "multiclass",
        alpha: float = 0.3,
        beta: float = 0.7,
        gamma: float = 1.0,
        smooth: float = 1.0,
        per_image: bool = False,
        ignore_index: int | None = 255,
    ) -> None:
        super().__init__(mode, smooth, per_image, ignore_index)
        if alpha < 0 or beta < 0 or gamma <= 0:
            raise ValueError(f"tversky needs alpha, beta >= 0 and gamma > 0, got alpha={alpha}, beta={beta}, gamma={gamma}")
        self.alpha, self.beta, self.gamma = alpha, beta, gamma

    def loss_from_sums(self, true_positive: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
        false_positive = predicted - true_positive
        false_negative = actual - true_positive
        denominator = true_positive + self.alpha * false_positive + self.beta * false_negative + self.smooth
        index = (true_positive + self.smooth) / denominator.clamp(min=self.eps)
        return ((1 - index).clamp(min=0) ** self.gamma).mean()
