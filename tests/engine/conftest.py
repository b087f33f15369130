"""Tiny training settings shared by the engine tests: a 2-level U-Net on 32x32 synthetic shapes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console

from seglab.engine.config import TrainConfig
from seglab.engine.trainer import Trainer


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 1-epoch run directory, shared read-only by the inference tests."""
    torch.set_num_threads(1)
    summary = train_tiny(tmp_path_factory.mktemp("runs"), name="tiny")
    return Path(summary["run_dir"])
