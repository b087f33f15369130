"""The engine tests' shared fixture: one finished tiny run (helpers live in engine_helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import train_tiny


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 1-epoch run directory, shared read-only by the inference tests."""
    torch.set_num_threads(1)
    summary = train_tiny(tmp_path_factory.mktemp("runs"), name="tiny")
    return Path(summary["run_dir"])


@pytest.fixture
def separate_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32 inference's rule without the one-pass F(4x4) (`seglab.engine.winograd.fused_pays`,
    which only processors with AVX-512 take): the same counts of Winograd convolutions on any
    machine."""
    import seglab.engine.winograd as rule

    monkeypatch.setattr(rule, "_fuses_natively", lambda: False)
