"""Pad an image to a size a network can digest, and crop its output back.

Encoders halve the resolution several times; a side that is not a multiple of the total stride
would be rounded at every halving and the decoder's maps would no longer line up with the
skips. Padding the bottom/right edge to the next multiple and cropping the logits afterwards
gives exact, aligned shapes for any input size, odd ones included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seglab.ops.tracing import being_traced


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom and right edges so that H and W are multiples of `multiple`."""
    height, width = x.shape[-2:]
    pad_width, pad_height = (-width) % multiple, (-height) % multiple
    # A zero-width pad still copies the image (about 1 ms at 512 x 512), so eager code skips
    # it; traced and compiled code always pads: a branch on the size would be frozen into the
    # trace (TorchScript, ONNX) or guard the graph on it (torch.export's free sizes).
    if not being_traced() and isinstance(pad_width, int) and pad_width == 0 and pad_height == 0:
        return x
    return F.pad(x, (0, pad_width, 0, pad_height), mode="replicate")


def crop_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Keep the top-left `size` window (undoes `pad_to_multiple`)."""
    return x[..., : size[0], : size[1]]
