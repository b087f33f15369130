"""Numeric precision of training and inference: float32, bfloat16 or float16 autocast.

bfloat16 keeps float32's exponent range, so it trains without loss scaling; float16 does not,
so it comes with a gradient scaler. On the CPU only bfloat16 is offered. oneDNN multiplies it
natively on processors with AVX-512 BF16 or AMX, and `auto` takes it only there. AVX-512
processors without either (Skylake to Ice Lake, or a virtual machine that hides the BF16
flags) convert every value to float32 and back: a 3x3 convolution ran 4.6x slower in bfloat16
than in float32 on one such machine, so `auto` keeps float32 there, and an explicit
`bf16` runs with a warning. Where oneDNN has no bfloat16 at all, `bf16` is refused.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import ContextManager

import torch

__all__ = ["PRECISIONS", "Precision", "auto_precision", "resolve_precision", "cpu_supports_bf16", "cpu_runs_bf16", "cpu_has"]

PRECISIONS = ("32", "bf16", "16")
EMULATED_BF16 = ("--precision bf16: this CPU has no AVX-512 BF16 or AMX, so bfloat16 is computed by "
                 "conversion to float32, several times slower than --precision 32")
_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


@functools.cache
def cpu_runs_bf16() -> bool:
    """True when oneDNN computes bfloat16 on this processor, natively or by conversion to float32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def cpu_has(feature: str) -> bool:
    """PyTorch's probe `torch.cpu._is_<feature>_supported()` (avx512, avx512_bf16, amx_tile,
    ...); False where this PyTorch lacks it."""
    try:
        return bool(getattr(torch.cpu, f"_is_{feature}_supported")())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when this processor multiplies bfloat16 natively (AVX-512 BF16 or AMX) and oneDNN
    has kernels for it: the only CPUs where bfloat16 is faster than float32."""
    return cpu_runs_bf16() and (cpu_has("avx512_bf16") or cpu_has("amx_tile"))


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
    if name == "bf16" and device.type == "cpu":
        if not cpu_runs_bf16():
            raise ValueError("--precision bf16: this CPU has no bfloat16 support; use --precision 32")
        if not cpu_supports_bf16():
            warnings.warn(EMULATED_BF16, RuntimeWarning, stacklevel=2)
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use 16")
    scaler = torch.amp.GradScaler(device.type, enabled=name == "16")
    return Precision(name, device.type, _DTYPES[name], scaler)
