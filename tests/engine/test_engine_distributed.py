"""Data-parallel training on 2 CPU processes (gloo) against 1 process with the same global batch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_helpers import train_tiny, write_config

from seglab.engine.distributed import env_rank, launch, shard
from seglab.engine.int8 import cpu_runs_int8

# BatchNorm over the global batch (--sync-bn) makes the two runs the same computation; what
# remains is float32 summation order (gradients summed across processes, statistics in parts),
# so metrics agree to about 1e-6 here. TOLERANCE leaves room for that rounding to grow over
# 8 optimiser steps.
RUN = dict(epochs=2, train_samples=32, val_samples=16, batch_size=8, sync_bn=True)
TOLERANCE = 1e-3


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = write_config(tmp_path / "run.yaml", **RUN)
    code = launch(2, ["train", "--config", str(config), "--out", str(tmp_path), "--name", "two"])
    assert code == 0
    torch.set_num_threads(1)
    single = train_tiny(tmp_path, name="one", **RUN)
    two, one = _rows(tmp_path / "two"), _rows(Path(single["run_dir"]))
    assert len(two) == len(one) == RUN["epochs"]
    assert one[-1]["train_loss"] < one[0]["train_loss"]  # the runs did train
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss", "pixel_accuracy", "miou", "lr"):
            assert b[key] == pytest.approx(a[key], abs=TOLERANCE), key
    assert not (tmp_path / "two-2").exists()  # rank 1 wrote nothing of its own
    if cpu_runs_int8():  # the int8 record: the same ranges, and int8 scored on both ranks' shards together
        records = [json.loads((run / "best.json").read_text())["int8"] for run in (tmp_path / "two", Path(single["run_dir"]))]
        assert records[0]["ranges"].keys() == records[1]["ranges"].keys()
        for name, (low, high) in records[1]["ranges"].items():
            assert records[0]["ranges"][name] == pytest.approx([low, high], abs=TOLERANCE, rel=TOLERANCE), name
        for key in ("miou_float32", "miou_int8"):
            assert records[0][key] == pytest.approx(records[1][key], abs=TOLERANCE), key


def test_environment_and_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    context = env_rank()
    assert (context.rank, context.world_size, context.local_rank, context.is_main) == (2, 3, 2, False)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK=3 does not fit WORLD_SIZE=3"):
        env_rank()
    items = list(range(10))
    parts = [shard(items, rank, 3) for rank in range(3)]
    assert sorted(sum(parts, [])) == items and parts[2] == [2, 5, 8]
