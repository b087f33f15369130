"""Helpers shared by the engine tests: tiny training settings (a 2-level U-Net on 32x32 shapes),
and the mark for tests that need a CPU with native bfloat16."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console

from seglab.engine.config import TrainConfig
from seglab.engine.precision import cpu_runs_bf16
from seglab.engine.trainer import Trainer

# oneDNN refuses bf16 kernels on processors without AVX-512 (or AVX-NE-CONVERT), and seglab
# refuses `--precision bf16` there.
needs_bf16 = pytest.mark.skipif(not cpu_runs_bf16(), reason="this CPU has no bfloat16 support")
BF16 = pytest.param(torch.bfloat16, marks=needs_bf16, id="bf16")


def tiny_options(**overrides: Any) -> dict[str, Any]:
    """Options of a run that takes about a second per epoch on one thread."""
    options = {
        "model_kwargs": {"base_channels": 4, "depth": 2},
        "image_size": 32,
        "train_samples": 32,
        "val_samples": 16,
        "batch_size": 8,
        "epochs": 1,
        "lr": 0.01,
        "num_overlays": 1,
        # exact float32 arithmetic and plain CE, so that equivalence tests can compare to 1e-6
        "precision": "32",
        "loss": "ce",
    }
    options.update(overrides)
    return options


def write_config(path: Path, **overrides: Any) -> Path:
    path.write_text(yaml.safe_dump(tiny_options(**overrides)))
    return path


def quiet_console() -> Console:
    return Console(quiet=True)


def train_tiny(out: Path, **overrides: Any) -> dict[str, Any]:
    config = TrainConfig.from_dict(tiny_options(out=str(out), **overrides))
    return Trainer(config, console=quiet_console()).fit()
