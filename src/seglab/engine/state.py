"""The training state behind `--resume`: everything needed to continue a run exactly.

One file, `<run>/resume.pt`, written atomically at the end of every epoch: model, EMA, optimiser,
scheduler and gradient-scaler states, the random number generators, the epoch, the metrics
history and the early-stopping bookkeeping. It holds only tensors and plain Python values, so
it is read back with `torch.load(weights_only=True)` (no arbitrary unpickling).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seglab.files import atomic_write

__all__ = ["RESUME_FILE", "rng_state", "set_rng_state", "save_training_state", "load_training_state"]

RESUME_FILE = "resume.pt"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states as tensors and plain values."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(run_dir: str | Path, state: dict[str, Any]) -> Path:
    path = Path(run_dir) / RESUME_FILE
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(run_dir: str | Path) -> dict[str, Any]:
    """The state saved by :func:`save_training_state`; a clear error when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume: run directory {run_dir} does not exist")
    path = run_dir / RESUME_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} holds no {RESUME_FILE}; it finished no epoch yet or is not a seglab run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"--resume: {path} is not a readable seglab training state ({error.__class__.__name__})") from None
