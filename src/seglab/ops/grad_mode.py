"""Whether autograd records an operation: the one test behind every choice between a
differentiable route (training) and an inference one (native kernels without a backward, passes
in place, values kept from one call to the next)."""
from __future__ import annotations

import torch


def records_gradients(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an operation on `tensors` (None ignored): gradients are enabled
    and at least one of them requires its gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
