"""Pad an image to a size a network can digest, and crop its output back.

Encoders halve the resolution several times; a side that is not a multiple of the total stride
would be rounded at every halving and the decoder's maps would no longer line up with the
skips. Padding the bottom/right edge to the next multiple and cropping the logits afterwards
gives exact, aligned shapes for any input size, odd ones included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom and right edges so that H and W are multiples of `multiple`."""
    height, width = x.shape[-2:]
    # No shortcut for "already a multiple": a branch on the size would be frozen by tracing
    # exporters (TorchScript, ONNX), and a zero-width pad is cheap.
    return F.pad(x, (0, (-width) % multiple, 0, (-height) % multiple), mode="replicate")


def crop_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Keep the top-left `size` window (undoes `pad_to_multiple`)."""
    return x[..., : size[0], : size[1]]
