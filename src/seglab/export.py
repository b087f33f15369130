"""Export a model for deployment: ONNX (run it with onnxruntime) or TorchScript.

Both trace one forward pass of an eval-mode model on a dummy ``N x C x H x W`` input (N = 2
where the batch is a free axis, which torch.export would otherwise take for the constant 1).
Every seglab semantic model pads its input to a multiple of its stride and crops its output
without branching on the size, so one trace serves any batch and image size (``dynamic=True``):
the free axes are named ``batch``, ``height`` and ``width`` in the graph, and, where
onnxruntime is installed, a semantic export is run at another batch and size and compared
with the model before it is written. A graph that does not hold there is refused in one error.

Two ONNX exporters: ``dynamo=True`` (default) uses ``torch.export`` (PyTorch's supported path,
needs onnxscript) and handles every semantic model; ``dynamo=False`` is the older
TorchScript-based exporter, 5-10x faster to run, which cannot export adaptive pooling to a grid
of an input whose size it does not know (PSPNet's pyramid pooling). The unpadded U-Net
(``padding="valid"``) computes its overlap-tile margins in Python from the image size, so its
export is valid for the traced size only (``dynamic=False``; a free size is refused by the
check above).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from seglab.files import atomic_write

__all__ = ["export_onnx", "export_torchscript"]


def _dummy_input(model: nn.Module, image_size: int | tuple[int, int] | list[int], in_channels: int,
                 batch: int = 1) -> torch.Tensor:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be N or (height, width) with positive sides, not {image_size!r}")
    device = next(model.parameters()).device
    return torch.zeros(batch, in_channels, int(image_size[0]), int(image_size[1]), device=device)


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
    # A free batch is traced at 2: torch.export takes an axis of size 1 for a constant, and
    # FCN's graph then fixed its output's batch to 1 (its Resize refused any other batch).
    example = _dummy_input(model, image_size, in_channels, batch=2 if dynamic and not one_image else 1)
    image_axes = {2: "height", 3: "width"} if one_image else {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad():  # eager first: checks that read weights (FCN's fixed upsampling) settle
        model(example)
    checked = dynamic and not one_image and list(outputs) == list(LOGITS)

    def write(temporary: Path) -> None:
        if dynamo:
            fixed = _name_free_axes(program, {"image": image_axes, **outputs}) if dynamic else []
            if fixed:
                raise ValueError(f"cannot export {path} with a free image size: the graph fixes the input's "
                                 f"{' and '.join(fixed)}; export with a fixed size (--static)")
            program.save(str(temporary), external_data=False)
        else:
            torch.onnx.export(model, (example,), str(temporary), input_names=["image"], output_names=list(outputs),
                              opset_version=opset, dynamo=False,
                              dynamic_axes={"image": image_axes, **outputs} if dynamic else None)
        problem = _other_size_problem(model, temporary, example) if checked else None
        if problem:
            raise ValueError(f"cannot export {path} with a free image size: at {problem}, so the graph holds at "
                             f"the traced size only. Export with a fixed size (--static)")

    with warnings.catch_warnings():
        # Both exporters warn about things that do not concern a user (deprecation, tracer notes).
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = ({axis: torch.export.Dim.AUTO for axis in image_axes},) if dynamic else None
            program = torch.onnx.export(
                model, (example,), input_names=["image"], output_names=list(outputs), opset_version=opset,
                dynamo=True, dynamic_shapes=shapes, verbose=False,
            )
        atomic_write(path, write)
    return path


def _other_size_problem(model: nn.Module, graph: Path | torch.jit.ScriptModule, example: torch.Tensor) -> str | None:
    """Run the exported `graph` (an ONNX file, by onnxruntime, or a TorchScript trace) on another
    batch and an odd, smaller size than the traced `example`'s and compare it with `model`: None
    where it agrees (or onnxruntime is not installed), else what differed. A graph traced with
    the image size as a constant (a model that computes with it in Python) otherwise exports
    without a word and returns wrong shapes at other sizes."""
    height, width = (max(8, side // 2) + 3 for side in example.shape[-2:])
    probe = torch.rand(3, example.shape[1], height, width, generator=torch.Generator().manual_seed(0))
    where = f"batch 3, {height} x {width}"
    with torch.no_grad():
        expected = model(probe).float()
    try:
        if isinstance(graph, Path):
            try:
                import onnxruntime
            except ImportError:
                return None
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 4  # its own log of the failure would repeat the error below
            session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"image": probe.numpy()})[0])
        else:
            with torch.no_grad():
                got = graph(probe).float()
    except Exception as error:  # the runtimes raise their own classes; any failure is the graph's
        return f"{where} it failed ({str(error).strip().splitlines()[0][:200]})"
    if tuple(got.shape) != tuple(expected.shape):
        return f"{where} the graph returned {tuple(got.shape)} where the model returns {tuple(expected.shape)}"
    tolerance = 1e-3 * max(1.0, float(expected.abs().max()))
    error = float((got - expected).abs().max())
    if error > tolerance:
        return f"{where} the graph's logits differ from the model's by up to {error:.3g}"
    return None


def _name_free_axes(program: "torch.onnx.ONNXProgram", axes: Mapping[str, dict[int, str]]) -> list[str]:
    """Give the graph's free axes the names of `axes` (value name -> axis -> name), where
    torch.export calls them s0, s1, ... or, for an output axis, writes the expression it derived
    (a U-Net's logits' height: the padded size less the crops, which is the image's, but not in
    a form sympy reduces). Returns the input axes that `torch.export` fixed instead ("height 64")."""
    values = {value.name: value for value in (*program.model.graph.inputs, *program.model.graph.outputs)}
    renames: dict[str, str] = {}
    fixed = []
    for value_name, value_axes in axes.items():
        shape = values[value_name].shape if value_name in values else None
        for axis, name in value_axes.items():
            if shape is None or axis >= len(shape):
                continue
            dim = shape[axis]
            if isinstance(dim, int):
                if value_name == "image":
                    fixed.append(f"{name} {dim}")
            elif isinstance(dim.value, str) and dim.value not in renames:
                renames[dim.value] = name
    program.rename_axes(renames)
    return fixed


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
    problem = _other_size_problem(model, traced, example)
    if problem:
        warnings.warn(f"{path}: the trace holds at the traced size ({example.shape[-2]} x {example.shape[-1]}) "
                      f"only: at {problem}", UserWarning, stacklevel=2)
    atomic_write(path, lambda tmp: traced.save(str(tmp)))
    return path
