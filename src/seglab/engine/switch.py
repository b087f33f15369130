"""A context that switches a route on in some of a model's modules for its duration: the
native training routes (`seglab.engine.attention`, `seglab.engine.mix_ffn`) are module
attributes that the trainer turns on around each step, so that evaluation outside it runs the
modules' ordinary operators."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn

from seglab.engine.precision import resolve_precision

__all__ = ["ModuleSwitch", "in_cpu_bf16_training"]


class ModuleSwitch:
    """Sets `attribute` to True on each of `modules` on entry, and back to its own value on exit."""

    def __init__(self, modules: list[nn.Module], attribute: str) -> None:
        self.modules = modules
        self.attribute = attribute
        self.before: list[bool] = []

    def __enter__(self) -> ModuleSwitch:
        self.before = [getattr(m, self.attribute) for m in self.modules]
        for module in self.modules:
            setattr(module, self.attribute, True)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for module, before in zip(self.modules, self.before):
            setattr(module, self.attribute, before)


def in_cpu_bf16_training(switch: Callable[[nn.Module], ModuleSwitch], model: nn.Module, kind: type[nn.Module],
                         device: torch.device | str, precision: str | int, enabled: bool,
                         available: Callable[[], bool]) -> ContextManager:
    """`switch(model)` where `enabled`, the model trains under bf16 autocast on the CPU, has
    modules of `kind` and the route is `available()` (asked last: it may build the native
    kernels); elsewhere a context that changes nothing."""
    device = torch.device(device)
    if (enabled and device.type == "cpu" and resolve_precision(precision, device).name == "bf16"
            and any(isinstance(m, kind) for m in model.modules()) and available()):
        return switch(model)
    return contextlib.nullcontext()
