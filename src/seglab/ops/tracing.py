"""Whether the code runs under a tracer (TorchScript, ONNX export, torch.compile / torch.export)."""
from __future__ import annotations

import torch

__all__ = ["being_traced"]


def being_traced() -> bool:
    """True while TorchScript traces, ONNX exports or dynamo compiles / exports: eager-only
    shortcuts that branch on sizes or take loops over them must not be recorded there (the
    branch would be frozen into the trace, or guard a graph meant for free sizes)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
