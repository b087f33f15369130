"""Learning-rate schedules, and ending them within a time budget (--fit-to-budget)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from engine_helpers import quiet_console, tiny_options

from seglab.cli import main
from seglab.engine import trainer as trainer_module
from seglab.engine.config import TrainConfig
from seglab.engine.trainer import LearningRateShape, Trainer, epochs_within_budget, set_schedule_end


def test_learning_rate_shape_warms_up_then_follows_its_curve() -> None:
    cosine = LearningRateShape("cosine", warmup_steps=4, total_steps=14)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == 1.0 and cosine(9) == pytest.approx(0.5) and cosine(14) == 0.0 and cosine(99) == 0.0
    poly = LearningRateShape("poly", warmup_steps=0, total_steps=10)
    assert poly(5) == pytest.approx(0.5**0.9) and poly(10) == 0.0
    assert LearningRateShape("constant", warmup_steps=0, total_steps=10)(7) == 1.0


def test_warm_up_defaults_to_the_models_recipe_and_the_user_wins() -> None:
    assert TrainConfig().warmup_epochs == 0.0  # the main job's U-Net
    assert TrainConfig(model="segformer").warmup_epochs == 1.0  # SegFormer's recipe (models/registry)
    assert TrainConfig(model="segformer", warmup_epochs=0).warmup_epochs == 0
    assert TrainConfig(model="not-a-model").warmup_epochs == 0.0  # the trainer names the model
    assert TrainConfig(model="fpn", encoder="mit_b0").warmup_epochs == 1.0  # the Mix Transformer's recipe
    assert TrainConfig(model="fpn", encoder="resnet34").warmup_epochs == 0.0
    assert TrainConfig(model="fpn", encoder="pvt_v2_b0").warmup_epochs == 1.0  # timm's, by its attention
    assert TrainConfig(model="fpn", encoder="pvt_v2_b0", warmup_epochs=0).warmup_epochs == 0
    assert TrainConfig.from_dict(TrainConfig(model="segformer").to_dict()).warmup_epochs == 1.0
    with pytest.raises(ValueError, match="--warmup-epochs"):
        TrainConfig(warmup_epochs=-0.5)


def test_segformers_warm_up_spans_its_first_epoch() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = trainer_module.build_scheduler(optimizer, TrainConfig(model="segformer", epochs=3), steps_per_epoch=10)
    factors = [scheduler.lr_lambdas[0](step) for step in range(12)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]) and factors[10] == 1.0 > factors[11]


def test_epochs_within_budget_counts_whole_epochs_at_the_last_pace() -> None:
    assert epochs_within_budget(1, 200.0, 200.0, 600.0, planned=10) == 3  # 400 s left: two more
    assert epochs_within_budget(2, 200.0, 450.0, 600.0, planned=10) == 2  # 150 s left: none
    assert epochs_within_budget(1, 10.0, 10.0, 600.0, planned=5) == 5  # never beyond the plan
    assert epochs_within_budget(3, 300.0, 900.0, 600.0, planned=10) == 3  # over budget: the ones done


def test_set_schedule_end_moves_the_curve_and_survives_a_state_dict_round_trip() -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    make = lambda: torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([parameter], lr=1.0), LearningRateShape("cosine", 0, 100))
    scheduler = make()
    assert set_schedule_end(scheduler, epochs=5, steps_per_epoch=10) and not set_schedule_end(scheduler, 5, 10)
    restored = make()
    restored.load_state_dict(scheduler.state_dict())  # what a resumed run does
    assert restored.lr_lambdas[0].total_steps == 50


class _FakeTime:
    """The trainer module's clock: each epoch takes 190 s, everything else a millisecond."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1e-3
        return self.now


def _budgeted_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_in_epoch: int | None = None, **options) -> Trainer:
    """A tiny run with a 10-minute budget whose epochs take 190 s on the trainer's clock, and
    which raises in epoch `crash_in_epoch` (as a killed run would stop)."""
    torch.set_num_threads(1)
    clock = _FakeTime()
    monkeypatch.setattr(trainer_module, "time", clock)
    trainer = Trainer(TrainConfig.from_dict(tiny_options(out=str(tmp_path), max_minutes=10, train_samples=16, **options)), console=quiet_console())
    one_epoch = trainer.train_one_epoch

    def slow_epoch(progress, epoch):
        if epoch == crash_in_epoch:
            raise RuntimeError(f"killed in epoch {epoch}")
        clock.now += 190.0
        return one_epoch(progress, epoch)

    trainer.train_one_epoch = slow_epoch
    return trainer


@pytest.mark.parametrize("fit", [False, True])
def test_a_budgeted_run_anneals_within_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fit: bool) -> None:
    summary = _budgeted_trainer(tmp_path, monkeypatch, epochs=10, fit_to_budget=fit).fit()
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    # Two steps per epoch. Without the fit the run stops after the epoch that crosses 600 s (the
    # 4th, 760 s), 8 steps down a 20-step cosine; with it, after epoch 1 (190 s) two more fit, so
    # the curve ends with epoch 3 (570 s): 4 of 6 steps after epoch 2, 0 after epoch 3.
    if fit:
        assert len(rows) == 3 and rows[-1]["lr"] == 0.0
        assert rows[1]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))
    else:
        assert len(rows) == 4 and rows[-1]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 8 / 20)))


def test_fit_to_budget_needs_a_budget(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="--max-minutes"):
        TrainConfig.from_dict(tiny_options(fit_to_budget=True))
    assert main(["train", "--fit-to-budget", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["seglab: error: --fit-to-budget needs a time budget: give --max-minutes too"]


@pytest.mark.parametrize("fit", [False, True])
def test_resume_keeps_a_fitted_curve_and_follows_new_epochs_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fit: bool
) -> None:
    first = _budgeted_trainer(tmp_path, monkeypatch, crash_in_epoch=2, epochs=4, fit_to_budget=fit)
    with pytest.raises(RuntimeError, match="killed"):
        first.fit()  # after epoch 1 (190 s of 600) the fit ends the curve after epoch 3
    resumed = Trainer.resume(first.run_dir, {"epochs": 6}, console=quiet_console())
    # A fitted run resumes on its fitted curve; otherwise the curve ends with the new --epochs.
    assert resumed.scheduler.lr_lambdas[0].total_steps == (3 if fit else 6) * first.steps_per_epoch
