"""Memory layout helpers."""
from __future__ import annotations

import torch

__all__ = ["in_layout_of"]


def in_layout_of(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`tensor` contiguous in `reference`'s memory format: channels-last if `reference` is,
    otherwise the default. Kernels derived from a weight keep the weight's layout (oneDNN would
    reorder them at every call otherwise); a branch joining channels-last maps stays channels-last."""
    channels_last = reference.dim() == 4 and reference.is_contiguous(memory_format=torch.channels_last)
    return tensor.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
