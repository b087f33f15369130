"""Model registry: a name maps to a builder function, nothing more.

Builders are plain functions with keyword arguments. A checkpoint stores the name and the
keyword arguments it was built with, so `create_model(name, **kwargs)` rebuilds it exactly.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

__all__ = ["ModelEntry", "register_model", "create_model", "list_models", "get_model_entry", "UnknownModelError"]


class UnknownModelError(KeyError):
    """Raised for a model name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; a plain sentence reads better
        return str(self.args[0])


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    task: str  # "semantic", "instance" or "image2image"
    paper: str

    @property
    def summary(self) -> str:
        doc = (self.builder.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, task: str = "semantic", paper: str = "") -> Callable:
    """Decorator registering `builder` under `name` (lower case, unique)."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[key] = ModelEntry(key, builder, task, paper)
        return builder

    return decorator


def get_model_entry(name: str) -> ModelEntry:
    _ensure_populated()
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name, e.g. ``create_model("unet", num_classes=6)``."""
    entry = get_model_entry(name)
    parameters = inspect.signature(entry.builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(kwargs) - set(parameters))
        if unknown:
            raise ValueError(f"model {entry.name!r} does not take the option(s) {', '.join(unknown)}")
    return entry.builder(**kwargs)


def list_models(task: str | None = None) -> list[str]:
    """Names of the registered models, optionally only those of one task."""
    _ensure_populated()
    return sorted(n for n, e in _REGISTRY.items() if task is None or e.task == task)


def _ensure_populated() -> None:
    # Importing the model packages runs their @register_model decorators.
    import seglab.models.semantic  # noqa: F401
    import seglab.models.instance  # noqa: F401
