"""The training loop's options and failure handling, on tiny runs of about a second per epoch."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import quiet_console, tiny_options, train_tiny
from PIL import Image

from seglab.data.stats import median_frequency_weights
from seglab.engine import trainer as trainer_module
from seglab.engine.config import TrainConfig
from seglab.engine.ema import ModelEMA
from seglab.engine.int8 import cpu_runs_int8
from seglab.engine.precision import cpu_runs_bf16
from seglab.engine.trainer import Trainer, use_deterministic_kernels
from seglab.losses import WeightedSum

NO_NORM = {"base_channels": 4, "depth": 2, "norm": None}


def make_trainer(tmp_path: Path, **overrides) -> Trainer:
    torch.set_num_threads(1)
    return Trainer(TrainConfig.from_dict(tiny_options(out=str(tmp_path), **overrides)), console=quiet_console())


def test_loss_comes_from_build_loss_with_median_frequency_weights(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, loss="ce+dice", class_weights="median_frequency")
    assert isinstance(trainer.loss_fn, WeightedSum)
    assert trainer.class_weights == pytest.approx(median_frequency_weights(trainer.train_set))
    with pytest.raises(ValueError, match="median_frequency"):
        make_trainer(tmp_path, class_weights="inverse")


def test_gradient_accumulation_matches_one_large_batch(tmp_path: Path) -> None:
    """Two accumulated batches of 4 take the same step as one batch of 8 (no BatchNorm)."""
    common = dict(model_kwargs=NO_NORM, train_samples=8, val_samples=4, optimizer="sgd", scheduler="constant")
    large = make_trainer(tmp_path / "a", batch_size=8, **common)
    accumulated = make_trainer(tmp_path / "b", batch_size=4, accumulate=2, **common)
    for trainer in (large, accumulated):
        trainer.fit_start = 0.0
        with trainer_module.progress_bar(quiet_console(), disable=True) as progress:
            trainer.train_one_epoch(progress, 1)
    assert large.scheduler.last_epoch == accumulated.scheduler.last_epoch == 1
    for a, b in zip(large.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradient_clipping_bounds_the_sgd_step(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, model_kwargs=NO_NORM, train_samples=8, batch_size=8, optimizer="sgd",
                           scheduler="constant", lr=0.1, weight_decay=0.0, clip_grad_norm=1e-3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with trainer_module.progress_bar(quiet_console(), disable=True) as progress:
        trainer.train_one_epoch(progress, 1)
    step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(trainer.model.parameters(), before)))
    assert 0 < float(step.detach()) <= 0.1 * 1e-3 * 1.001


def test_ema_follows_the_weights_with_a_warm_up() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ModelEMA(model, decay=0.9)
    torch.nn.init.ones_(model.weight)
    ema.update(model)  # first update: decay min(0.9, 2/11)
    assert float(ema.module.weight[0, 0]) == pytest.approx(1 - 2 / 11)
    with pytest.raises(ValueError, match="ema-decay"):
        ModelEMA(model, decay=1.0)


def test_ema_run_saves_the_averaged_weights(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, ema_decay=0.5)
    trainer.fit()
    from safetensors.torch import load_file

    saved = load_file(str(trainer.run_dir / "last.safetensors"))
    ema_state = trainer.ema.module.state_dict()
    assert all(torch.equal(saved[k], ema_state[k]) for k in saved)
    raw = torch.load(trainer.run_dir / "resume.pt", weights_only=True)["model"]  # the trained, unaveraged weights
    assert any(not torch.equal(saved[k], v) for k, v in raw.items() if v.is_floating_point())


def test_early_stopping_ends_a_run_that_stops_improving(tmp_path: Path) -> None:
    summary = train_tiny(tmp_path, epochs=6, lr=1e-12, scheduler="constant", patience=1)
    assert summary["epochs_run"] == 2  # epoch 2 is no better than epoch 1 with a frozen model
    lines = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, epochs=3)
    loss_fn, calls = trainer.loss_fn, []
    batches_per_epoch = len(trainer.train_loader)

    def poisoned(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(logits.requires_grad)
        training_calls = sum(calls)
        loss = loss_fn(logits, target)
        return loss * float("nan") if logits.requires_grad and training_calls > batches_per_epoch + 1 else loss

    trainer.loss_fn = poisoned
    with pytest.raises(FloatingPointError, match=r"epoch 2, batch 2.*last good checkpoint .*last \(epoch 1\)"):
        trainer.fit()
    saved = json.loads((trainer.run_dir / "last.json").read_text())
    assert saved["epoch"] == 1


def test_unwritable_run_directory_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    trainer = make_trainer(blocker / "runs")
    with pytest.raises(ValueError, match="cannot write the run directory"):
        trainer.fit()
    assert trainer.history == []


def test_full_disk_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tmp_path)
    monkeypatch.setattr(trainer_module.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1024})())
    with pytest.raises(ValueError, match="not enough free disk space"):
        trainer.fit()
    assert trainer.history == [] and not (trainer.run_dir / "metrics.jsonl").exists()


@pytest.mark.skipif(not cpu_runs_bf16(), reason="this CPU has no bfloat16 support")
def test_bf16_training_runs_and_learns(tmp_path: Path) -> None:
    summary = train_tiny(tmp_path, precision="bf16", epochs=2)
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(row["train_loss"] == row["train_loss"] for row in rows)  # finite, not NaN
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_float16_on_the_cpu_is_refused_with_advice(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device; on the CPU use --precision bf16"):
        make_trainer(tmp_path, precision="16")


def test_tensorboard_logs_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    summary = train_tiny(tmp_path, tensorboard=True)
    assert list((Path(summary["run_dir"]) / "tensorboard").glob("events.out.tfevents.*"))


def test_float32_cpu_training_runs_under_winograd_unless_direct_convolutions(tmp_path: Path, monkeypatch) -> None:
    import seglab.engine.trainer as trainer_module

    asked = []
    real = trainer_module.training_convolutions

    def recording(model, device, precision, enabled=True, deterministic=False, int8_products=False):
        asked.append((precision, enabled, deterministic, int8_products))
        return real(model, device, precision, enabled, deterministic=deterministic, int8_products=int8_products)

    monkeypatch.setattr(trainer_module, "training_convolutions", recording)
    runs = [(False, False, False), (True, False, False), (False, True, False)]
    if cpu_runs_int8():
        runs.append((False, False, True))
    for direct, deterministic, int8_products in runs:
        trainer = make_trainer(tmp_path / f"{direct}-{deterministic}-{int8_products}", precision="32",
                               direct_convolutions=direct, deterministic=deterministic, int8_products=int8_products,
                               epochs=1, train_samples=4, val_samples=2)
        trainer.fit()
        # the checkpoint says which arithmetic trained it
        training = json.loads((trainer.run_dir / "best.json").read_text())["training"]
        assert training == {"precision": "32", "int8_products": int8_products}
    assert asked == [("32", not direct, deterministic, int8_products) for direct, deterministic, int8_products in runs]


def test_int8_products_are_refused_with_one_line_where_they_would_not_run(tmp_path: Path, monkeypatch) -> None:
    if cpu_runs_int8():
        if cpu_runs_bf16():
            with pytest.raises(ValueError, match="--int8-products: float32 training only"), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")  # bf16 without native support warns first
                make_trainer(tmp_path, precision="bf16", int8_products=True)
        with pytest.raises(ValueError, match="drop --direct-convolutions"):
            make_trainer(tmp_path, precision="32", direct_convolutions=True, int8_products=True)
    monkeypatch.setattr("seglab.engine.int8.cpu_runs_int8", lambda: False)
    with pytest.raises(ValueError, match="--int8-products: needs a CPU with VNNI or AMX"):
        make_trainer(tmp_path, precision="32", int8_products=True)


def test_int8_products_say_how_many_convolutions_take_them_or_that_none_does(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("seglab.engine.int8.cpu_runs_int8", lambda: True)  # only the message is checked
    small = make_trainer(tmp_path / "unet", precision="32", int8_products=True)  # 16 base channels
    assert "none of unet's convolutions" in small._int8_products_line()
    assert "float32 throughout" in small._int8_products_line()
    resnet50 = make_trainer(tmp_path / "deeplab", precision="32", int8_products=True, model="deeplabv3", model_kwargs={},
                            encoder="resnet50")
    assert resnet50._int8_products_line().startswith(
        "int8 products: 31 1x1 convolutions and 3 atrous convolutions' windows (forward and input gradient in int8")


def test_precision_auto_trains_with_int8_products_where_float32_runs_on_an_int8_cpu(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    # A CPU with VNNI (or AMX) but no native bf16, where `auto` resolves to float32.
    monkeypatch.setattr(trainer_module, "cpu_runs_int8", lambda: True)
    monkeypatch.setattr("seglab.engine.precision.cpu_supports_bf16", lambda: False)
    resnet50 = dict(model="deeplabv3", model_kwargs={}, encoder="resnet50")
    auto = make_trainer(tmp_path / "auto", precision="auto", **resnet50)
    assert auto.int8_products and auto.convolutions.int8_products
    assert "--precision auto on a CPU with int8 but not bf16 products" in auto._int8_products_line()
    assert not make_trainer(tmp_path / "32", precision="32", **resnet50).int8_products  # exact float32
    assert not make_trainer(tmp_path / "off", precision="auto", int8_products=False, **resnet50).int8_products
    assert not make_trainer(tmp_path / "direct", precision="auto", direct_convolutions=True, **resnet50).int8_products
    asked = make_trainer(tmp_path / "asked", precision="32", int8_products=True, **resnet50)
    assert asked.int8_products and "--precision auto" not in asked._int8_products_line()
    # No 1x1 convolution of 128 x 512 channel pairs or more: auto leaves it off, and says nothing.
    assert not make_trainer(tmp_path / "unet", precision="auto").int8_products
    monkeypatch.setattr(trainer_module, "cpu_runs_int8", lambda: False)
    assert not make_trainer(tmp_path / "no-vnni", precision="auto", **resnet50).int8_products


def test_int8_products_must_be_a_boolean_or_unset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int8_products must be true, false or null"):
        TrainConfig.from_dict(tiny_options(out=str(tmp_path), int8_products="yes"))


def test_deterministic_on_a_gpu_asks_for_cudnns_and_pytorchs_deterministic_algorithms(monkeypatch) -> None:
    asked = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda mode, warn_only=False: asked.append((mode, warn_only)))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    use_deterministic_kernels(torch.device("cpu"))  # the CPU's side is the training route's fixed kernels
    assert asked == [] and torch.backends.cudnn.benchmark and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    use_deterministic_kernels(torch.device("cuda", 0))
    assert asked == [(True, True)]  # warn_only: an operator without a deterministic kernel warns, the run goes on
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_int8_calibration_images_are_the_train_split_without_random_augmentation(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k in range(4):
            for folder, pixels in (("images", rng.integers(0, 256, (40, 48, 3))), ("masks", rng.integers(0, 2, (40, 48)))):
                (tmp_path / "data" / folder / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "data" / folder / split / f"{k}.png")
    trainer = make_trainer(tmp_path / "runs", data=str(tmp_path / "data"), format="folder", image_size=32)
    seen = []

    def capture(dataset, normalize, device="cpu"):
        seen.append(dataset)
        return []

    monkeypatch.setattr(trainer_module, "calibration_images", capture)
    monkeypatch.setattr(trainer_module, "measure_int8", lambda *args, **kwargs: None)
    trainer.best = {"miou": 0.5}
    trainer._store_int8_ranges()
    (calibration_set,) = seen
    draws = []
    for seed in range(3):  # the default training augmentation (scale jitter, crop, flips) would differ per draw
        torch.manual_seed(seed)
        draws.append(calibration_set[0]["image"])
    assert all(torch.equal(draws[0], draw) for draw in draws[1:])
    whole = torch.from_numpy(np.array(Image.open(tmp_path / "data" / "images" / "train" / "0.png"))).permute(2, 0, 1)
    resized = torch.nn.functional.interpolate(whole[None].float() / 255, size=(32, 32), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(draws[0], resized, atol=0.02, rtol=0)  # the whole image resized, not a crop of it


def test_augment_given_for_the_synthetic_set_is_warned_about(tmp_path: Path) -> None:
    # The synthetic set draws its samples and is never augmented: say so rather than ignore it.
    with pytest.warns(UserWarning, match="augment does not apply to the synthetic set"):
        make_trainer(tmp_path, augment={"hflip": 0.5})
