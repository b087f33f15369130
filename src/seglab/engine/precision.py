"""Numeric precision of training and inference: float32, bfloat16 or float16 autocast.

bfloat16 keeps float32's exponent range, so it trains without loss scaling; float16 does not,
so it comes with a gradient scaler. On the CPU only bfloat16 is offered (oneDNN runs it fast
on processors with AVX-512 BF16 or AMX; elsewhere it is refused rather than silently slow).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

__all__ = ["PRECISIONS", "Precision", "auto_precision", "resolve_precision", "cpu_supports_bf16"]

PRECISIONS = ("32", "bf16", "16")
_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bfloat16 kernels for this processor."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class Precision:
    """The autocast context and gradient scaler for one precision on one device."""

    name: str
    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def auto_precision(device: torch.device) -> str:
    """bf16 where the device computes it natively (AVX-512 BF16 / AMX CPUs, CUDA with bf16
    support), float16 on older CUDA devices, float32 elsewhere."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "16"
    return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "32"


def resolve_precision(name: str | int, device: torch.device) -> Precision:
    """Check that `name` (auto, 32, bf16 or 16) runs on `device` and build its :class:`Precision`."""
    name = str(name).lower().replace("fp", "").replace("float", "")
    if name == "auto":
        name = auto_precision(device)
    name = {"bfloat16": "bf16", "b16": "bf16"}.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"--precision must be auto, 32, bf16 or 16, not {name!r}")
    if name == "16" and device.type != "cuda":
        raise ValueError("--precision 16 (float16) needs a CUDA device; on the CPU use --precision bf16")
    if name == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        raise ValueError("--precision bf16: this CPU has no native bfloat16 support; use --precision 32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use 16")
    scaler = torch.amp.GradScaler(device.type, enabled=name == "16")
    return Precision(name, device.type, _DTYPES[name], scaler)
