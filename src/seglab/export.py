"""Export a model for deployment: ONNX (run it with onnxruntime) or TorchScript.

Both trace one forward pass of an eval-mode model on a dummy ``1 x C x H x W`` input. Every
seglab semantic model pads its input to a multiple of its stride and crops its output without
branching on the size, so one trace serves any batch and image size (``dynamic=True``).

Two ONNX exporters: ``dynamo=True`` (default) uses ``torch.export`` (PyTorch's supported path,
needs onnxscript) and handles every semantic model; ``dynamo=False`` is the older
TorchScript-based exporter, 5-10x faster to run, which cannot export adaptive pooling to a grid
of an input whose size it does not know (PSPNet's pyramid pooling). The original U-Net computes
its centre padding in Python from the image size, so its ONNX export is valid for the traced
size only (``dynamic=False``).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from seglab.files import atomic_write

__all__ = ["export_onnx", "export_torchscript"]


def _dummy_input(model: nn.Module, image_size: int | tuple[int, int] | list[int], in_channels: int) -> torch.Tensor:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be N or (height, width) with positive sides, not {image_size!r}")
    device = next(model.parameters()).device
    return torch.zeros(1, in_channels, int(image_size[0]), int(image_size[1]), device=device)


def _output_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.parent.exists():
        raise FileNotFoundError(f"export folder {str(path.parent)!r} does not exist")
    return path


LOGITS = {"logits": {0: "batch", 2: "height", 3: "width"}}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int | tuple[int, int] = 512,
    in_channels: int = 3,
    dynamic: bool = True,
    opset: int = 18,
    dynamo: bool = True,
    outputs: Mapping[str, dict[int, str]] = LOGITS,
    one_image: bool = False,
) -> Path:
    """Write `model` as ONNX to `path` with input ``image`` and the outputs named by `outputs`
    (name -> its free axes; default ``logits``, N x K x H x W); with `dynamic`, height and
    width are free axes, and so is the batch unless `one_image`. Returns the path."""
    path = _output_path(path)
    model = model.eval()
    example = _dummy_input(model, image_size, in_channels)
    image_axes = {2: "height", 3: "width"} if one_image else {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        # Both exporters warn about things that do not concern a user (deprecation, tracer notes).
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = ({axis: torch.export.Dim.AUTO for axis in image_axes},) if dynamic else None
            program = torch.onnx.export(
                model, (example,), input_names=["image"], output_names=list(outputs), opset_version=opset,
                dynamo=True, dynamic_shapes=shapes, verbose=False,
            )
            atomic_write(path, lambda tmp: program.save(str(tmp), external_data=False))
        else:
            axes = {"image": image_axes, **outputs}
            atomic_write(path, lambda tmp: torch.onnx.export(
                model, (example,), str(tmp), input_names=["image"], output_names=list(outputs), opset_version=opset,
                dynamo=False, dynamic_axes=axes if dynamic else None,
            ))
    return path


def export_torchscript(
    model: nn.Module, path: str | Path, *, image_size: int | tuple[int, int] = 512, in_channels: int = 3
) -> Path:
    """Trace `model` with torch.jit.trace and save it to `path` (load with torch.jit.load)."""
    path = _output_path(path)
    model = model.eval()
    example = _dummy_input(model, image_size, in_channels)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
    atomic_write(path, lambda tmp: traced.save(str(tmp)))
    return path
