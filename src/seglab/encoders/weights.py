"""Reading encoder weights from a local file, safely.

A `.safetensors` file is read with safetensors; anything else with
``torch.load(weights_only=True)``, which refuses to unpickle arbitrary objects. A checkpoint
that wraps its weights (``{"state_dict": ...}`` or ``{"model": ...}``) is unwrapped.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["read_state_dict", "load_weights_file", "looks_like_path"]


def looks_like_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or Path(weights).suffix in (".safetensors", ".pt", ".pth", ".bin")


def read_state_dict(path: str | Path, what: str = "encoder weights file") -> dict[str, torch.Tensor]:
    """The tensors of a weights file; `what` names the file in error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{what} {str(path)!r} does not hold a state dict")
    return state


def load_weights_file(module: nn.Module, path: str | Path, first_conv: str | None = None) -> None:
    """Load `path` into `module`. Keys the module does not have (a classifier head) are
    ignored; every key the module has must be present. If `first_conv` names the first
    convolution's weight and the file was trained on a different number of input channels,
    that weight is adapted (cycled and rescaled, as timm does) instead of failing."""
    state = read_state_dict(path)
    own = module.state_dict()
    if first_conv in own and first_conv in state:
        trained, needed = state[first_conv], own[first_conv]
        if trained.dim() == 4 and trained.shape[1] != needed.shape[1]:
            state[first_conv] = adapt_input_channels(trained, needed.shape[1])
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(
            f"encoder weights file {str(path)!r} lacks {len(missing)} of the encoder's tensors, e.g. {missing[:3]}"
        )
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"encoder weights file {str(path)!r} has {k} of shape {tuple(state[k].shape)}, "
            f"the encoder needs {tuple(own[k].shape)}"
        )
    module.load_state_dict({k: state[k] for k in own})


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Turn an RGB first-conv weight into one for `in_channels`: grayscale sums the colour
    filters; more channels repeat them cyclically, rescaled to keep the activation scale."""
    trained = weight.shape[1]
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // trained)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (trained / in_channels)
