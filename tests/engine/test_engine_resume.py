"""`--resume`: a run killed mid-epoch (SIGKILL) and resumed ends exactly like an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import quiet_console, tiny_options, write_config

from seglab.engine.config import TrainConfig
from seglab.engine.trainer import Trainer

# Half a second per epoch on one thread; dropout-free U-Net with BatchNorm and AdamW + cosine.
RUN = dict(epochs=3, train_samples=48, val_samples=8, batch_size=8)
COMPARED = ("train_loss", "val_loss", "pixel_accuracy", "miou", "mdice", "fwiou", "lr")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _saved_epoch(run_dir: Path) -> int:
    try:
        return int(torch.load(run_dir / "resume.pt", weights_only=True)["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = write_config(tmp_path / "run.yaml", **RUN)
    command = [sys.executable, "-m", "seglab", "train", "--config", str(config), "--out", str(tmp_path), "--name", "killed"]
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while _saved_epoch(run_dir) < 1:
            assert process.poll() is None, "training ended before its first epoch was saved"
            assert time.monotonic() < deadline, "training saved no epoch within 60 s"
            time.sleep(0.05)
        epoch_seconds = _rows(run_dir)[0]["epoch_seconds"]
        time.sleep(0.5 * epoch_seconds)  # into the middle of epoch 2
        assert process.poll() is None
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    killed_after = _saved_epoch(run_dir)
    assert 1 <= killed_after < RUN["epochs"], "the kill must interrupt the run before its last epoch"

    resumed = subprocess.run([sys.executable, "-m", "seglab", "train", "--resume", str(run_dir)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after epoch {killed_after}" in resumed.stderr

    torch.set_num_threads(1)
    uninterrupted = Trainer(TrainConfig.from_dict(tiny_options(out=str(tmp_path), name="whole", **RUN)), console=quiet_console())
    uninterrupted.fit()
    expected, got = _rows(uninterrupted.run_dir), _rows(run_dir)
    assert [row["epoch"] for row in got] == list(range(1, RUN["epochs"] + 1))
    for want, have in zip(expected, got):
        for key in COMPARED:
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (want["epoch"], key)


def test_resume_refuses_a_folder_without_state_and_changed_options(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a seglab run directory"):
        Trainer.resume(tmp_path)
    (tmp_path / "config.yaml").write_text("epochs: 1\n")
    with pytest.raises(FileNotFoundError, match="holds no resume.pt"):
        Trainer.resume(tmp_path)
    with pytest.raises(ValueError, match="only --epochs.* may change, not --model"):
        Trainer.resume(tmp_path, {"model": "fcn"})


def test_a_run_on_a_relative_data_path_resumes_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index in range(2):
            for sub, pixels in (("images", rng.integers(0, 256, (16, 16, 3))), ("masks", rng.integers(0, 2, (16, 16)))):
                (tmp_path / "project" / "data" / split / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "project" / "data" / split / sub / f"{index}.png")
    monkeypatch.chdir(tmp_path / "project")
    options = tiny_options(data="data", out=str(tmp_path / "runs"), batch_size=2, num_overlays=0)
    options.pop("train_samples"), options.pop("val_samples"), options.pop("image_size")
    config = TrainConfig.from_dict(options)
    assert config.data == str(tmp_path / "project" / "data") and config.run_name == "unet-data"
    Trainer(config, console=quiet_console()).fit()
    monkeypatch.chdir(tmp_path)  # elsewhere: "data" names nothing here
    Trainer.resume(tmp_path / "runs" / "unet-data", {"epochs": 2}, console=quiet_console()).fit()
    assert [row["epoch"] for row in _rows(tmp_path / "runs" / "unet-data")] == [1, 2]
