"""Model size and cost: parameter count and GFLOPs at a given input size.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of a
single image in eval mode. Convention: **1 multiply-add = 2 FLOPs** (GFLOPs = 2 x GMACs / 1e9 is
what FlopCounterMode reports). Many papers (and fvcore, ptflops) report GMACs under the name
"GFLOPs": halve our figure to compare with those. Only convolutions, matrix products and
attention are counted; element-wise ops, norms and interpolation are not.

The model is built and run on the ``meta`` device: no memory is allocated and no arithmetic is
done, so even a 250M-parameter model at 512x512 is profiled in well under a second. Models with
data-dependent operations (instance segmentation's NMS) fall back to a real CPU forward pass.
RoIAlign is counted as torchvision's op (zero FLOPs, like every sampling op): seglab computes it
as a sparse matrix product, which the counter would take for a dense one.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import MethodType

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from seglab.models.registry import create_model, get_model_entry

__all__ = ["count_parameters", "count_flops", "counting_roi_align_as_torchvision", "describe_model"]


@contextlib.contextmanager
def counting_roi_align_as_torchvision(model: nn.Module) -> Iterator[None]:
    """Within the block, seglab's RoIAlign poolers run torchvision's (same numbers), so that
    FlopCounterMode does not count their sparse product as a dense matrix product."""
    from torchvision.ops import MultiScaleRoIAlign

    from seglab.ops.roi_align import SampledMultiScaleRoIAlign

    poolers = [m for m in model.modules() if isinstance(m, SampledMultiScaleRoIAlign)]
    for pooler in poolers:
        pooler.forward = MethodType(MultiScaleRoIAlign.forward, pooler)
    try:
        yield
    finally:
        for pooler in poolers:
            del pooler.forward


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def count_flops(model: nn.Module, image_size: int | tuple[int, int] = 512, in_channels: int = 3) -> int:
    """FLOPs (2 per multiply-add) of one eval-mode forward of a 1 x C x H x W input."""
    height, width = _size(image_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with counting_roi_align_as_torchvision(model), FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, in_channels, height, width, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def describe_model(name: str, *, num_classes: int = 21, image_size: int | tuple[int, int] = 512, **kwargs) -> dict:
    """Name, task, paper, parameter count and GFLOPs (2 FLOPs per multiply-add) of a
    registered model at `image_size`, e.g. ``describe_model("fcn8s")``."""
    entry = get_model_entry(name)
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **kwargs)
    in_channels = kwargs.get("in_channels", 3)
    height, width = _size(image_size)
    params = count_parameters(model)
    try:
        flops = count_flops(model, (height, width), in_channels)
    except (NotImplementedError, RuntimeError):
        # Data-dependent operations (a detector's NMS) cannot run on meta tensors: run for real.
        model = create_model(name, num_classes=num_classes, **kwargs)
        flops = count_flops(model, (height, width), in_channels)
    return {
        "name": entry.name,
        "task": entry.task,
        "paper": entry.paper,
        "params": params,
        "gflops": flops / 1e9,
        "image_size": [height, width],
    }
