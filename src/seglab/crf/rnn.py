"""CRF as RNN: mean-field iterations of a dense CRF as a trainable layer.

Zheng et al., "Conditional Random Fields as Recurrent Neural Networks", ICCV 2015. One
mean-field iteration is a stack of ordinary layers (Fig. 2 of the paper):

    message passing        -- the appearance and smoothness Gaussian filters of Q;
    weighting filter outputs -- a K x K matrix per kernel (label-dependent kernel weights);
    compatibility transform -- a learnt K x K label compatibility mu;
    adding unary potentials -- the network's logits minus the pairwise term;
    normalisation          -- softmax.

Unrolled for a fixed number of iterations it back-propagates into the network's logits and
into the weights and compatibility (the kernel widths stay fixed, as in the paper). Filtering
runs on the permutohedral lattice of `seglab.crf.lattice`, built once per batch of images.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from seglab.crf.dense import prepare_image, prepare_scores
from seglab.crf.kernels import PairwiseKernels

__all__ = ["CRFasRNN"]


class CRFasRNN(nn.Module):
    """Trainable mean-field layer: (image, logits N x K x H x W) -> refined logits, same shape.

    Parameters (learnt): `appearance_weights` and `smoothness_weights` (K x K, initialised to
    w1 and w2 times identity) and `compatibility` (K x K, initialised to Potts, 1 - identity).
    The output is the last iteration's pre-softmax scores, ready for cross-entropy.
    """

    def __init__(
        self,
        num_classes: int,
        theta_alpha: float = 80.0,
        theta_beta: float = 13.0,
        theta_gamma: float = 3.0,
        w1: float = 10.0,
        w2: float = 3.0,
        iterations: int = 5,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations}")
        for name, value in (("theta_alpha", theta_alpha), ("theta_beta", theta_beta), ("theta_gamma", theta_gamma)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        eye = torch.eye(num_classes)
        self.num_classes, self.iterations = num_classes, int(iterations)
        self.kernels = PairwiseKernels(float(theta_alpha), float(theta_beta), float(theta_gamma))
        self.appearance_weights = nn.Parameter(w1 * eye)
        self.smoothness_weights = nn.Parameter(w2 * eye)
        self.compatibility = nn.Parameter(1.0 - eye)

    def forward(self, image: torch.Tensor | np.ndarray, logits: torch.Tensor) -> torch.Tensor:
        image = prepare_image(image, logits).to(logits.device)
        logits = prepare_scores(logits, image)
        n, k, h, w = logits.shape
        if k != self.num_classes:
            raise ValueError(f"logits have {k} channels but the layer was built for {self.num_classes} classes")
        appearance, smoothness = self.kernels.build(image)

        unary = logits.permute(0, 2, 3, 1).reshape(-1, k).float()
        scores = unary
        for _ in range(self.iterations):
            q = torch.softmax(scores, dim=1)
            weighted = appearance(q) @ self.appearance_weights.T + smoothness(q) @ self.smoothness_weights.T
            scores = unary - weighted @ self.compatibility.T
        return scores.reshape(n, h, w, k).permute(0, 3, 1, 2)
