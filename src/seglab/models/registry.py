"""Model registry: a name maps to a builder function (and the few training options the model's
recipe needs where the user gives none, e.g. SegFormer's warm-up).

Builders are plain functions with keyword arguments. A checkpoint stores the name and the
keyword arguments it was built with, so `create_model(name, **kwargs)` rebuilds it exactly.
"""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

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
    zero_allowed: tuple[str, ...] = ()  # integer options for which 0 means something (else >= 1)
    # training options (TrainConfig fields) this model's recipe sets where the user gives none,
    # e.g. SegFormer's learning-rate warm-up; see TrainConfig.__post_init__
    recipe: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))

    @property
    def summary(self) -> str:
        doc = (self.builder.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, task: str = "semantic", paper: str = "", zero_allowed: tuple[str, ...] = (),
                   recipe: Mapping[str, Any] | None = None) -> Callable:
    """Decorator registering `builder` under `name` (lower case, unique). Integer options are
    sizes and counts, checked to be >= 1 by `create_model`, except those in `zero_allowed`
    (>= 0, e.g. Mask R-CNN's min_size=0: no resizing). `recipe` holds the training options the
    model needs where the user gives none (`TrainConfig` fields, e.g. ``{"warmup_epochs": 1.0}``)."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[key] = ModelEntry(key, builder, task, paper, tuple(zero_allowed),
                                    types.MappingProxyType(dict(recipe or {})))
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
    _check_option_types(entry, kwargs)
    return entry.builder(**kwargs)


_SCALARS = (bool, int, float, str)


def _check_option_types(entry: ModelEntry, kwargs: dict) -> None:
    """A value of the wrong scalar type ("proto_width=abc") or an integer size below 1
    ("proto_width=-1") is one clear error here, not a RuntimeError deep inside a layer. Only
    int / float / str / bool hints (or their unions with None) are checked; an int passes for
    a float."""
    try:
        hints = typing.get_type_hints(entry.builder)
    except (NameError, TypeError):  # unresolvable annotations: nothing to check against
        return
    for key, value in kwargs.items():
        hint = hints.get(key)
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
        if not allowed or not all(t in _SCALARS or t is type(None) for t in allowed):
            continue
        accepted = set(allowed) | ({int} if float in allowed else set())
        if type(value) not in accepted and not (value is None and type(None) in allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"model {entry.name!r} option {key} must be {names}, got {value!r}")
        if int in allowed and type(value) is int:
            least = 0 if key in entry.zero_allowed else 1
            if value < least:
                raise ValueError(f"model {entry.name!r} option {key} must be at least {least}, got {value}")


def list_models(task: str | None = None) -> list[str]:
    """Names of the registered models, optionally only those of one task."""
    _ensure_populated()
    return sorted(n for n, e in _REGISTRY.items() if task is None or e.task == task)


def _ensure_populated() -> None:
    # Importing the model packages runs their @register_model decorators.
    import seglab.models.semantic  # noqa: F401
    import seglab.models.instance  # noqa: F401
