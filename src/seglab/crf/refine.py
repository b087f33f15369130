"""One-call dense-CRF refinement for the engine and the command line.

`refine(image, probabilities, params)` runs `DenseCRF` with DeepLab-style defaults;
`parse_crf_params("theta_alpha=80,theta_beta=13,...")` reads the `--crf-params` option.

Parameter names (Krähenbühl & Koltun 2011; the pydensecrf equivalent in brackets):
    theta_alpha  appearance kernel, position width in pixels   [addPairwiseBilateral sxy]
    theta_beta   appearance kernel, colour width (0..255 units) [addPairwiseBilateral srgb]
    w1           appearance kernel weight                      [addPairwiseBilateral compat]
    theta_gamma  smoothness kernel, position width in pixels   [addPairwiseGaussian sxy]
    w2           smoothness kernel weight                      [addPairwiseGaussian compat]
    iterations   mean-field iterations                         [inference(n)]
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from seglab.crf.dense import DenseCRF

__all__ = ["DEFAULT_CRF_PARAMS", "make_crf", "parse_crf_params", "refine"]

# The setting of pydensecrf's example, widely used on DeepLab outputs: a wide appearance
# kernel (80 px, 13 grey levels, weight 10) and a narrow smoothness kernel (3 px, weight 3).
DEFAULT_CRF_PARAMS: dict[str, float | int] = {
    "theta_alpha": 80.0,
    "theta_beta": 13.0,
    "w1": 10.0,
    "theta_gamma": 3.0,
    "w2": 3.0,
    "iterations": 5,
}


def parse_crf_params(text: str | None) -> dict[str, float | int]:
    """'theta_alpha=60, iterations=10' -> {'theta_alpha': 60.0, 'iterations': 10}; '' -> {}."""
    params: dict[str, float | int] = {}
    if text is None or not text.strip():
        return params
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"--crf-params item {item.strip()!r} must look like name=value")
        if name not in DEFAULT_CRF_PARAMS:
            raise ValueError(f"unknown CRF parameter {name!r} in --crf-params; known: {', '.join(DEFAULT_CRF_PARAMS)}")
        try:
            params[name] = int(value) if name == "iterations" else float(value)
        except ValueError:
            raise ValueError(f"CRF parameter {name} must be a number, got {value!r}") from None
    return params


def make_crf(params: Mapping[str, float | int] | None = None) -> DenseCRF:
    """A DenseCRF with `DEFAULT_CRF_PARAMS` overridden by `params` (names checked)."""
    unknown = set(params or {}) - set(DEFAULT_CRF_PARAMS)
    if unknown:
        raise ValueError(f"unknown CRF parameter(s) {sorted(unknown)}; known: {', '.join(DEFAULT_CRF_PARAMS)}")
    return DenseCRF(**{**DEFAULT_CRF_PARAMS, **(params or {})})


def refine(
    image: torch.Tensor | np.ndarray,
    probabilities: torch.Tensor,
    params: Mapping[str, float | int] | None = None,
) -> torch.Tensor:
    """Refine N x K x H x W probabilities (or logits) with a dense CRF over `image` (see
    `DenseCRF` for accepted layouts); `params` override `DEFAULT_CRF_PARAMS`."""
    return make_crf(params)(image, probabilities)
