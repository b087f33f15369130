"""Fully connected CRF with Gaussian edge potentials, solved by mean-field inference.

Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials", NeurIPS 2011, as DeepLab (Chen et al. 2015) applies it to a network's output:

    E(x) = sum_i psi_u(x_i) + sum_{i,j} mu(x_i, x_j) k(f_i, f_j)
    psi_u(x_i) = -log P(x_i)                                  (the network's probabilities)
    k(f_i, f_j) = w1 exp(-|p_i - p_j|^2 / 2 theta_alpha^2 - |I_i - I_j|^2 / 2 theta_beta^2)
                + w2 exp(-|p_i - p_j|^2 / 2 theta_gamma^2)

Mean field replaces P(x) by a product of per-pixel distributions Q_i and iterates

    Q_i(l) <- softmax_l( -psi_u(l) - sum_l' mu(l, l') sum_m w_m [k_m * Q](i, l') )

where each k_m * Q is one Gaussian filter of all K label maps at once, done in linear time by
the permutohedral lattice. As in the reference implementation (pydensecrf), each kernel is
symmetrically normalised, D^-1/2 k D^-1/2 with D the kernel's row sums, and the filter
includes the pixel itself; Potts compatibility is applied as a reward -w [l == l'], which
gives the same Q as the penalty w [l != l'] (they differ by a per-pixel constant).
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from seglab.crf.kernels import KernelSum, PairwiseKernels
from seglab.data.io import unit_range
from seglab.ops.grad_mode import records_gradients

__all__ = ["DenseCRF", "log_probabilities", "prepare_image", "prepare_scores"]

# Floor on probabilities before -log, as pydensecrf's unary_from_softmax (clip=1e-5).
MIN_PROBABILITY = 1e-5


class DenseCRF(nn.Module):
    """Dense CRF post-processing: (image, probabilities or logits) -> refined probabilities.

    Args:
        theta_alpha: positional width of the appearance (bilateral) kernel, in pixels.
        theta_beta: colour width of the appearance kernel, in 8-bit intensity units.
        theta_gamma: positional width of the smoothness (Gaussian) kernel, in pixels.
        w1: weight of the appearance kernel.  w2: weight of the smoothness kernel.
        iterations: mean-field iterations.
        compatibility: "potts", or a K x K label compatibility matrix mu (an energy: the
            cost of labels l and l' at two similar pixels; Potts is 1 - identity).

    `forward(image, scores)`: image uint8 (0..255) or float (0..1), H x W x 3, 3 x H x W or
    N x 3 x H x W; scores N x K x H x W (or K x H x W), probabilities or logits (detected:
    probabilities are in [0, 1] and sum to 1 over K; force with `scores_are`). Returns
    probabilities shaped like `scores`, on their device.
    """

    def __init__(
        self,
        theta_alpha: float = 80.0,
        theta_beta: float = 13.0,
        theta_gamma: float = 3.0,
        w1: float = 10.0,
        w2: float = 3.0,
        iterations: int = 5,
        compatibility: str | torch.Tensor = "potts",
    ) -> None:
        super().__init__()
        for name, value in (("theta_alpha", theta_alpha), ("theta_beta", theta_beta), ("theta_gamma", theta_gamma)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name, value in (("w1", w1), ("w2", w2)):
            if not value >= 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        if int(iterations) != iterations or iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {iterations}")
        self.kernels = PairwiseKernels(float(theta_alpha), float(theta_beta), float(theta_gamma))
        self.w1, self.w2, self.iterations = float(w1), float(w2), int(iterations)
        if isinstance(compatibility, str):
            if compatibility != "potts":
                raise ValueError(f"compatibility must be 'potts' or a K x K matrix, got {compatibility!r}")
            self.register_buffer("compatibility", None)
        else:
            matrix = torch.as_tensor(compatibility, dtype=torch.float32)
            if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or not bool(torch.isfinite(matrix).all()):
                raise ValueError(f"compatibility must be a finite K x K matrix, got shape {tuple(matrix.shape)}")
            self.register_buffer("compatibility", matrix)

    def extra_repr(self) -> str:
        k = self.kernels
        compat = "potts" if self.compatibility is None else f"matrix {tuple(self.compatibility.shape)}"
        return (
            f"theta_alpha={k.theta_alpha}, theta_beta={k.theta_beta}, theta_gamma={k.theta_gamma}, "
            f"w1={self.w1}, w2={self.w2}, iterations={self.iterations}, compatibility={compat}"
        )

    def forward(self, image: torch.Tensor | np.ndarray, scores: torch.Tensor, scores_are: str = "auto") -> torch.Tensor:
        for q in self._mean_field(image, scores, scores_are, reuse_memory=True):
            pass
        return _to_scores_layout(q, scores)

    def steps(self, image: torch.Tensor | np.ndarray, scores: torch.Tensor, scores_are: str = "auto") -> Iterator[torch.Tensor]:
        """Yield Q before the first iteration (softmax of the unary) and after each iteration."""
        for q in self._mean_field(image, scores, scores_are):
            yield _to_scores_layout(q, scores)

    def energy(self, image: torch.Tensor | np.ndarray, scores: torch.Tensor, q: torch.Tensor, scores_are: str = "auto") -> torch.Tensor:
        """Mean-field free energy KL(Q || P) - log Z per image (N,), which inference lowers:
        sum_i,l Q (psi_u + log Q) + 1/2 sum_i,l Q_il [pairwise message of Q]_il."""
        log_p, image_nchw = self._log_probabilities_and_image(image, scores, scores_are)
        if q.shape != scores.shape:
            raise ValueError(f"q shape {tuple(q.shape)} does not match scores shape {tuple(scores.shape)}")
        q = _to_rows(q if q.dim() == 4 else q[None]).to(log_p)
        appearance, smoothness = self.kernels.build(image_nchw)
        messages = smoothness(q, appearance(q, weight=self.w1), self.w2)
        pairwise = -messages if self.compatibility is None else messages @ self.compatibility.to(q).T
        per_pixel = (q * (torch.log(q.clamp_min(1e-30)) - log_p) + 0.5 * q * pairwise).sum(dim=1)
        return per_pixel.reshape(image_nchw.shape[0], -1).sum(dim=1)

    def _mean_field(self, image, scores, scores_are, reuse_memory: bool = False) -> Iterator[torch.Tensor]:
        """Q as P x K rows (pixel-major), before the first iteration and after each.

        `reuse_memory`: each iteration writes over the Q of two iterations before (for callers
        that keep only the last one). A fresh P x K tensor is page-faulted in by the operating
        system on every use once it is larger than the allocator keeps (32 MB for glibc); at
        1280 x 960 with 21 labels that cost about 5% of the whole CRF."""
        log_p, image_nchw = self._log_probabilities_and_image(image, scores, scores_are)
        appearance, smoothness = self.kernels.build(image_nchw)
        # Q before the first iteration: softmax of the unary (the floor on probabilities can
        # break their sum), as exp of the max-shifted log P, which the Potts loop reuses.
        differentiable = records_gradients(log_p)
        max_log_p = log_p.amax(dim=1, keepdim=True)
        shifted_log_p = log_p - max_log_p if differentiable else log_p.sub_(max_log_p)  # log_p is ours: a fresh tensor
        q = shifted_log_p.exp()
        q *= q.sum(dim=1, keepdim=True).reciprocal_()
        yield q
        fast_potts = self.compatibility is None and not differentiable and self.w1 + self.w2 <= 20
        if fast_potts:
            both = KernelSum([appearance, smoothness], [self.w1, self.w2])
        spare = torch.empty_like(q) if fast_potts and reuse_memory and self.iterations > 1 else None
        for _ in range(self.iterations):
            if fast_potts:
                # Potts: reward agreement, added to the unary as the slice runs. The messages
                # are >= 0 and at most a few times w1 + w2, so with w1 + w2 <= 20 exp cannot
                # overflow float32 and needs no max-shift beyond the unary's own.
                new_q = both(q, shifted_log_p, out=spare).exp_()
                new_q *= new_q.sum(dim=1, keepdim=True).reciprocal_()
                q, spare = new_q, (q if spare is not None else None)
            else:
                messages = smoothness(q, appearance(q, weight=self.w1), self.w2)
                pairwise = -messages if self.compatibility is None else messages @ self.compatibility.to(q).T
                # exp(log_softmax) rather than softmax: several times faster over a short last dim on CPU.
                q = torch.log_softmax(shifted_log_p - pairwise, dim=1).exp_()
            yield q

    def _log_probabilities_and_image(self, image, scores, scores_are) -> tuple[torch.Tensor, torch.Tensor]:
        image_nchw = prepare_image(image, scores)
        scores_nkhw = prepare_scores(scores, image_nchw)
        if self.compatibility is not None and self.compatibility.shape[0] != scores_nkhw.shape[1]:
            raise ValueError(
                f"compatibility is {tuple(self.compatibility.shape)} but scores have {scores_nkhw.shape[1]} labels"
            )
        log_p = log_probabilities(_to_rows(scores_nkhw.float()), scores_are)  # rows first: one copy fewer
        return log_p, image_nchw.to(log_p.device)


def log_probabilities(scores: torch.Tensor, scores_are: str = "auto") -> torch.Tensor:
    """log P (the negated unary potential) from probabilities, floored at MIN_PROBABILITY,
    or from logits (log_softmax), labels on dim 1 (N x K x H x W, or P x K rows). `scores`
    must already be checked finite (prepare_scores)."""
    if scores_are not in ("auto", "probabilities", "logits"):
        raise ValueError(f"scores_are must be 'auto', 'probabilities' or 'logits', got {scores_are!r}")
    scores = scores.float()
    low, high = (float(v) for v in torch.aminmax(scores.detach()))
    in_unit_range = low >= 0 and high <= 1
    if scores_are == "auto":
        scores_are = "probabilities" if in_unit_range and _sums_to_one(scores) else "logits"
    if scores_are == "logits":
        return torch.log_softmax(scores, dim=1)
    if not in_unit_range:
        raise ValueError("probabilities must lie in [0, 1]; pass scores_are='logits' for unnormalised scores")
    floored = scores.clamp_min(MIN_PROBABILITY)
    return floored.log() if floored.requires_grad else floored.log_()


def _sums_to_one(scores: torch.Tensor) -> bool:
    return bool(((scores.sum(dim=1) - 1).abs() < 1e-3).all())


def prepare_image(image: torch.Tensor | np.ndarray, scores: torch.Tensor) -> torch.Tensor:
    """Any accepted image layout -> float32 N x 3 x H x W in 0..255 (theta_beta's units)."""
    image = torch.as_tensor(image)
    if image.dim() == 3:
        if image.shape[-1] == 3:
            image = image.permute(2, 0, 1)
        elif image.shape[0] != 3:
            raise ValueError(f"image must be H x W x 3, 3 x H x W or N x 3 x H x W, got shape {tuple(image.shape)}")
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be H x W x 3, 3 x H x W or N x 3 x H x W, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float()
    return unit_range(image) * 255.0  # float (0..1) or uint16, checked


def prepare_scores(scores: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Check scores against the (prepared) image; return them as N x K x H x W."""
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if scores.dim() == 3:
        scores = scores[None]
    if scores.dim() != 4:
        raise ValueError(f"scores must be N x K x H x W or K x H x W, got shape {tuple(scores.shape)}")
    if scores.shape[1] < 1:
        raise ValueError("scores must have at least one label channel")
    if scores.shape[0] != image.shape[0] or scores.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"image ({image.shape[0]} x {image.shape[2]} x {image.shape[3]}, N x H x W) and scores "
            f"({scores.shape[0]} x {scores.shape[2]} x {scores.shape[3]}) must have the same batch size and size"
        )
    if not all(math.isfinite(float(v)) for v in torch.aminmax(scores.detach().float())):  # one pass; NaN propagates
        raise ValueError("scores (probabilities or logits) contain NaN or infinite values")
    return scores


def _to_rows(nkhw: torch.Tensor) -> torch.Tensor:
    """N x K x H x W -> P x K, row-major. For one image the plain reshape would be a column-major
    view, and every sparse product and softmax downstream would then copy or stride through it
    (about a third of the whole CRF's time at 320x240); one transposition up front is cheaper."""
    return nkhw.permute(0, 2, 3, 1).reshape(-1, nkhw.shape[1]).contiguous()


def _to_scores_layout(rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """P x K rows back to the shape of `scores` (N x K x H x W or K x H x W), as a view in
    channels_last memory format: copying to the default layout would be a transposition of the
    whole result (~5% of the CRF's time); `.contiguous()` gives it to a caller who needs it."""
    n, k, h, w = scores.shape if scores.dim() == 4 else (1, *scores.shape)
    nkhw = rows.reshape(n, h, w, k).permute(0, 3, 1, 2)
    return nkhw if scores.dim() == 4 else nkhw[0]
