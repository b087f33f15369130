"""Checkpoints: safetensors weights next to a JSON file that says how to rebuild the model.

A checkpoint `best` in a run directory is the pair `best.safetensors` + `best.json`. Loading
never unpickles anything: weights come from safetensors, the rest is JSON.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from seglab.files import atomic_write, atomic_write_json
from seglab.models import create_model

__all__ = ["CHECKPOINT_FORMAT", "checkpoint_stem", "save_checkpoint", "load_checkpoint", "resolve_checkpoint", "read_checkpoint_config",
           "update_checkpoint_config", "check_data_classes"]

CHECKPOINT_FORMAT = "seglab-checkpoint-v1"


_SUFFIXES = (".safetensors", ".json")
_STARTING_WEIGHTS = ("encoder_weights", "torchvision_weights")  # model options that only initialise


def checkpoint_stem(path: Path) -> Path:
    """The checkpoint's name without .safetensors / .json; other dots belong to the name ("model.v2")."""
    return path.with_suffix("") if path.suffix in _SUFFIXES else path


def _file(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def save_checkpoint(path: str | Path, model: nn.Module, config: dict[str, Any]) -> Path:
    """Write `<path>.safetensors` and `<path>.json`. `config` must hold "model" and "kwargs"."""
    stem = checkpoint_stem(Path(path))
    if "model" not in config or "kwargs" not in config:
        raise ValueError("checkpoint config needs the model name and its kwargs")
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        # A module reachable under two names (tied weights) lists one tensor twice; safetensors
        # refuses shared memory, so later names get a copy and the state dict loads as it was.
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        tensors[name] = tensor.clone() if pointer in seen else tensor
        if pointer is not None:
            seen.add(pointer)
    weights = _file(stem, ".safetensors")
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT}))
    atomic_write_json(_file(stem, ".json"), {"format": CHECKPOINT_FORMAT, **config})
    return weights


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory (its best checkpoint), a .safetensors or a .json; return the stem."""
    path = Path(path)
    if path.is_dir():
        for name in ("best", "last"):
            if (path / f"{name}.safetensors").is_file():
                return path / name
        raise FileNotFoundError(f"no checkpoint (best.safetensors or last.safetensors) in run directory {path}")
    if path.suffix not in _SUFFIXES and path.is_file():
        raise ValueError(f"{path} is not a seglab checkpoint: give a run directory, or its .safetensors or .json file")
    stem = checkpoint_stem(path)
    weights, config = _file(stem, ".safetensors"), _file(stem, ".json")
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not config.is_file():
        raise ValueError(f"{weights} is not a seglab checkpoint: {config.name} is missing beside it")
    return stem


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    stem = resolve_checkpoint(path)
    config_file = _file(stem, ".json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not a seglab checkpoint config ({error})") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{config_file} is not a seglab checkpoint config")
    return config


def update_checkpoint_config(path: str | Path, **entries: Any) -> Path:
    """Add (or replace) top-level `entries` of a checkpoint's JSON, atomically; its weights stay."""
    stem = resolve_checkpoint(path)
    config = read_checkpoint_config(stem)
    config.update(entries)
    return atomic_write_json(_file(stem, ".json"), config)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the JSON config and load its safetensors weights (eval mode)."""
    stem = resolve_checkpoint(path)
    config = read_checkpoint_config(stem)
    # Options naming starting weights (a file, or a download) only initialise a model; the
    # checkpoint's own tensors replace them, so rebuilding never reads (or needs) those again.
    kwargs = {key: value for key, value in config["kwargs"].items() if key not in _STARTING_WEIGHTS}
    model = create_model(config["model"], **kwargs)
    weights = _file(stem, ".safetensors")
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights} is not a readable safetensors file ({error})") from None
    built = model.state_dict()
    reshaped = [name for name, tensor in state.items() if name in built and built[name].shape != tensor.shape]
    if reshaped:  # load_state_dict would raise a RuntimeError listing every one
        first = reshaped[0]
        raise ValueError(f"{weights} does not match model {config['model']!r} as {_file(stem, '.json').name} builds it: "
                         f"{len(reshaped)} tensors of other shapes (e.g. {first}: {tuple(state[first].shape)} in the file, "
                         f"{tuple(built[first].shape)} in the model)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match model {config['model']!r}: {len(missing)} missing, {len(unexpected)} unexpected tensors")
    return model.to(map_location).eval(), config


def check_data_classes(checkpoint_classes: list[str], data_classes: list[str] | tuple[str, ...], data: str) -> None:
    """Refuse to score a checkpoint on data of another class count (class k of the one would be
    scored as class k of the other, or not at all: figures without meaning); warn where only
    the names differ (e.g. a classes.yaml added after training)."""
    ours, theirs = list(checkpoint_classes), list(data_classes)
    if len(ours) != len(theirs):
        raise ValueError(f"{data} has {len(theirs)} classes ({_names(theirs)}) but the checkpoint predicts "
                         f"{len(ours)} ({_names(ours)}): score it on data with its classes")
    if ours != theirs:
        warnings.warn(f"{data} names its classes {_names(theirs)}, the checkpoint {_names(ours)}: scored by index")


def _names(classes: list[str], shown: int = 6) -> str:
    return ", ".join(classes[:shown]) + (f", ... {len(classes) - shown} more" if len(classes) > shown else "")
