"""The training loop: plain PyTorch, one epoch of training then one evaluation pass.

A run directory `<out>/<name>/` receives the config (YAML), `last` and `best` checkpoints
(safetensors + JSON), `resume.pt` (the full training state for `--resume`), `metrics.jsonl`
(one line per epoch), `curves.png`, overlay PNGs of a few validation predictions next to their
ground truth and, with `--tensorboard`, TensorBoard event files.

Multi-process runs (torchrun, or `seglab train --nproc N`) wrap the model in
DistributedDataParallel; `batch_size` stays the global batch, split evenly over the processes,
so the same recipe gives the same optimisation on any number of processes. Only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from seglab.data import open_dataset
from seglab.data.doctor import preflight
from seglab.data.stats import median_frequency_weights
from seglab.engine.attention import training_attention
from seglab.engine.mix_ffn import training_mix_ffn
from seglab.engine.checkpoint import save_checkpoint, update_checkpoint_config
from seglab.engine.config import TrainConfig, load_yaml
from seglab.engine.distributed import agree, all_reduce_sum, barrier, init_distributed
from seglab.engine.ema import ModelEMA
from seglab.engine.evaluator import Normalize, evaluate, logits_of
from seglab.engine.fastpath import optimizer_options, to_channels_last, training_convolutions, training_norms
from seglab.engine.int8 import cpu_runs_int8, require_int8
from seglab.engine.int8_checkpoint import AUTO_TOLERANCE, auto_inference_precision, calibration_images, measure_int8
from seglab.engine.precision import resolve_precision
from seglab.engine.syncbn import convert_sync_batchnorm
from seglab.engine.state import load_training_state, rng_state, save_training_state, set_rng_state
from seglab.files import PICTURE_COMPRESS_LEVEL, append_line, atomic_write_png, atomic_write_text
from seglab.interrupts import raise_if_interrupted
from seglab.losses import build_loss, float32_logits_for
from seglab.metrics.report import format_report
from seglab.models import create_model
from seglab.ops.atrous_gemm import int8_window_candidates
from seglab.ops.class_map import class_indices
from seglab.ops.int8_products import MIN_PRODUCT_CHANNELS, int8_pointwise_candidates
from seglab.viz import plot_curves, prediction_panel

__all__ = [
    "LearningRateShape",
    "RESUMABLE_OPTIONS",
    "Trainer",
    "build_scheduler",
    "end_schedule_within_budget",
    "epochs_within_budget",
    "progress_bar",
    "resolve_device",
    "seed_everything",
    "set_schedule_end",
    "unique_run_dir",
    "use_deterministic_kernels",
]

# What `--resume` may change in a run's saved config; the rest would make it a different run.
RESUMABLE_OPTIONS = ("epochs", "max_minutes", "fit_to_budget", "workers", "device", "tensorboard", "patience",
                     "int8_calibration")
SUMMARY_KEYS = ("pixel_accuracy", "mean_accuracy", "miou", "mdice", "fwiou")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_deterministic_kernels(device: torch.device) -> None:
    """`--deterministic` on a GPU (on the CPU it fixes the float32 weight-gradient kernels,
    `training_convolutions`): cuDNN's deterministic algorithms without autotuning, cuBLAS's
    fixed workspace (read when its first handle is made, so before the first step), and
    PyTorch's deterministic kernels where it has them; the operators without one (bilinear
    upsampling's backward, for one) say so in a warning rather than stopping the run."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when present; a multi-process job puts each process on its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def progress_bar(console: Console, disable: bool = False) -> Progress:
    """The progress bar used everywhere: description, bar, count, extra fields, elapsed, ETA.

    Transient: it disappears when done, so an error message stays the last, single line. Off
    when the console is not a terminal: there rich would draw nothing but leave an empty line.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=disable or not console.is_terminal,
        transient=True,
    )


def run_state(run: Any, epoch: int, elapsed: float) -> dict[str, Any]:
    """What `resume.pt` holds for either trainer (`Trainer`, `InstanceTrainer`) after `epoch`:
    model, optimiser, scheduler and scaler states, the generators, history, best epoch, the
    patience count and the time spent."""
    return {
        "epoch": epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.precision.scaler.state_dict(),
        "rng": rng_state(),
        "history": run.history,
        "best": run.best,
        "epochs_without_improvement": run.epochs_without_improvement,
        "elapsed": elapsed,
    }


def restore_run_state(run: Any, state: dict[str, Any], steps_per_epoch: int) -> None:
    """:func:`run_state`'s state back into `run`; the random generators last, since building
    the trainer drew from them."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if not run.config.fit_to_budget:  # the curve ends with --epochs, which a resume may change
        set_schedule_end(run.scheduler, run.config.epochs, steps_per_epoch)
    if state.get("scaler"):
        run.precision.scaler.load_state_dict(state["scaler"])
    run.start_epoch = int(state["epoch"])
    run.history = list(state["history"])
    run.best = state["best"]
    run.epochs_without_improvement = int(state.get("epochs_without_improvement", 0))
    run.elapsed_before = float(state["elapsed"])
    set_rng_state(state["rng"])


def resumed_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config a run in `run_dir` was started with, `overrides` applied where
    RESUMABLE_OPTIONS allow (a semantic or an instance run)."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} is not a seglab run directory (no config.yaml)")
    values = load_yaml(config_file)
    for key, value in (overrides or {}).items():
        if key not in RESUMABLE_OPTIONS and values.get(key) != value:
            allowed = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_OPTIONS)
            raise ValueError(f"--resume continues a run with its saved options; only {allowed} may change, not --{key.replace('_', '-')}")
        values[key] = value
    return TrainConfig.from_dict(values, source=str(config_file))


def unique_run_dir(out: str | Path, name: str) -> Path:
    """`out/name`, or `out/name-2`, `out/name-3`... so that no earlier run is overwritten."""
    base = Path(out) / name
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{name}-{number}")
    return candidate


def _json_safe(value: Any) -> Any:
    """Tensors to lists and NaN to null, so metrics.jsonl is valid JSON."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class LearningRateShape:
    """The factor of the base learning rate at each optimiser step: linear warm-up, then cosine,
    poly (power 0.9, DeepLab) or constant until ``total_steps``.

    A callable object rather than a closure, so LambdaLR's state dict keeps ``total_steps`` and a
    resumed run continues the same curve after :func:`set_schedule_end` moved its end.
    """

    def __init__(self, kind: str, warmup_steps: int, total_steps: int) -> None:
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "poly":
            return (1 - progress) ** 0.9
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over ``config.epochs`` (see :class:`LearningRateShape`)."""
    total = max(1, config.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LearningRateShape(config.scheduler, int(config.warmup_epochs * steps_per_epoch), total))


def epochs_within_budget(epochs_done: int, last_epoch_seconds: float, elapsed_seconds: float, budget_seconds: float, planned: int) -> int:
    """The epochs a run can finish within its time budget at the last epoch's pace: at least the
    ones already done, at most the planned ones."""
    if last_epoch_seconds <= 0:
        return planned
    more = int(max(0.0, budget_seconds - elapsed_seconds) // last_epoch_seconds)
    return max(epochs_done, min(planned, epochs_done + more))


def set_schedule_end(scheduler: torch.optim.lr_scheduler.LambdaLR, epochs: int, steps_per_epoch: int) -> bool:
    """End the learning-rate curve after ``epochs`` epochs; True when that moved it.

    A cosine cut short by a time budget stops at a high learning rate; ending the curve where the
    budget ends lets the run anneal as planned, only sooner. (The factor changes a little at the
    move: the current step now sits further along a shorter curve.)
    """
    total = max(1, epochs * steps_per_epoch)
    moved = False
    for shape in scheduler.lr_lambdas:
        if isinstance(shape, LearningRateShape) and shape.total_steps != total:
            shape.total_steps, moved = total, True
    return moved


def end_schedule_within_budget(
    scheduler: torch.optim.lr_scheduler.LambdaLR, config: TrainConfig, steps_per_epoch: int, epoch: int,
    epoch_seconds: float, elapsed_seconds: float, console: Console,
) -> bool:
    """After each epoch of a ``fit_to_budget`` run: end the learning-rate curve with the last epoch
    that fits ``max_minutes`` at the last epoch's pace; True when this epoch is that last one.

    Processes average their clocks first, so every rank anneals along the same curve and stops
    after the same epoch.
    """
    sums = all_reduce_sum(torch.tensor([epoch_seconds, elapsed_seconds, 1.0], dtype=torch.float64))
    epoch_seconds, elapsed_seconds = (sums[:2] / sums[2]).tolist()
    fitted = epochs_within_budget(epoch, epoch_seconds, elapsed_seconds, 60 * config.max_minutes, config.epochs)
    if set_schedule_end(scheduler, fitted, steps_per_epoch):
        console.print(f"learning-rate schedule now ends after epoch {fitted}: what fits the {config.max_minutes:g}-minute budget")
    if fitted <= epoch < config.epochs:
        console.print(f"time budget of {config.max_minutes:g} min: no further epoch fits")
    return fitted <= epoch


class Trainer:
    """Builds data, model and optimiser from a :class:`TrainConfig` and runs `fit()`.

    `resume_dir` continues that run from its `resume.pt` (see :meth:`resume`).
    """

    def __init__(self, config: TrainConfig, console: Console | None = None, resume_dir: str | Path | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dist = init_distributed(self.device.type)
        if self.device.type == "cuda":
            self.device = resolve_device(config.device, self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.console = console or Console(stderr=True)
        if not self.dist.is_main:
            self.console = Console(stderr=True, quiet=True)
        if config.batch_size % self.dist.world_size:
            raise ValueError(f"--batch-size {config.batch_size} (the global batch) must be divisible by the {self.dist.world_size} processes")
        self.precision = resolve_precision(config.precision, self.device)
        if config.int8_products:
            self._check_int8_products()
        self.summary_writer_class = self._tensorboard_writer_class() if config.tensorboard else None
        seed_everything(config.seed)
        if config.deterministic:
            use_deterministic_kernels(self.device)
        if config.data != "synthetic":  # refuse bad data now, not with a traceback mid-epoch
            problems = preflight(config.data, config.format,
                                 one_size=config.image_size is None and config.batch_size > 1)
            if problems:
                raise ValueError(f"the data set {config.data} is not fit to train on:\n  " + "\n  ".join(problems))
        self.train_set = open_dataset(config.data, "train", **self._data_options(train=True))
        if config.data == "synthetic" and config.augment:
            warnings.warn("augment does not apply to the synthetic set (its samples are drawn, not augmented); "
                          "it applies to data set folders")
        self.val_set = open_dataset(config.data, "val", **self._data_options(train=False))
        self.num_classes = self.train_set.num_classes
        self.ignore_index = self.train_set.ignore_index
        self.model_kwargs = {**config.model_kwargs, "num_classes": self.num_classes, "in_channels": self.train_set.in_channels}
        if config.encoder:
            self.model_kwargs["encoder"] = config.encoder
        model = create_model(config.model, **self.model_kwargs)
        if config.sync_bn and self.dist.enabled:
            model = convert_sync_batchnorm(model, self.device.type)
        self.model = to_channels_last(model.to(self.device))  # oneDNN's / cuDNN's native layout
        # DDP averages gradients over processes; evaluation and checkpoints use the bare model.
        self.train_model: nn.Module = DistributedDataParallel(self.model) if self.dist.enabled else self.model
        self.int8_products = self._int8_products()
        # Winograd's 3x3 convolutions on the CPU (float32; under bf16 autocast the widest, by
        # F(2x2)), unless asked not to; entered at each step.
        self.convolutions = training_convolutions(self.model, self.device, self.precision.name,
                                                  enabled=not config.direct_convolutions,
                                                  deterministic=config.deterministic,
                                                  int8_products=self.int8_products)
        # In bf16 on the CPU (unless `native_norms` is false), BatchNorm with the ReLU, or a ResNet
        # block's shortcut addition and ReLU, after it in one native kernel; entered at each step.
        self.norms = training_norms(self.model, self.device, self.precision.name,
                                    enabled=config.native_norms is not False)
        # In bf16 on the CPU (unless `native_attention` is false), SegFormer's attention heads by
        # the native kernel forward and its own backward; entered at each step.
        self.attention = training_attention(self.model, self.device, self.precision.name,
                                            enabled=config.native_attention is not False)
        # In bf16 on the CPU (unless `native_mix_ffn` is false), the Mix-FFN's depthwise convolution
        # and GELU by one native kernel each way; entered at each step.
        self.mix_ffn = training_mix_ffn(self.model, self.device, self.precision.name,
                                        enabled=config.native_mix_ffn is not False)
        self.ema = ModelEMA(self.model, config.ema_decay) if config.ema_decay else None
        self.normalize = Normalize(config.mean, config.std).to(self.device)
        self.class_weights = self._class_weights()
        self.loss_fn = build_loss(
            config.loss, num_classes=self.num_classes, ignore_index=self.ignore_index, class_weights=self.class_weights
        ).to(self.device)
        self.per_process_batch = config.batch_size // self.dist.world_size
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=config.seed
        )
        self.train_loader = DataLoader(
            self.train_set,
            batch_size=self.per_process_batch,
            sampler=self.sampler,
            drop_last=len(self.sampler) > self.per_process_batch,
            num_workers=config.workers,
            persistent_workers=config.workers > 0,
        )
        # Each process evaluates its own slice (no padding, so no image counts twice).
        val_shard = Subset(self.val_set, range(self.dist.rank, len(self.val_set), self.dist.world_size))
        self.val_loader = DataLoader(val_shard, batch_size=self.per_process_batch, num_workers=config.workers)
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.start_epoch, self.elapsed_before = 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.epochs_without_improvement = 0
        self.resumed = resume_dir is not None
        self.run_dir = Path(resume_dir) if resume_dir is not None else self._new_run_dir()
        if resume_dir is not None:
            self._load_state(load_training_state(resume_dir))

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict[str, Any] | None = None, console: Console | None = None) -> "Trainer":
        """Continue the run in `run_dir` with its saved config; `overrides` may change RESUMABLE_OPTIONS."""
        return cls(resumed_config(run_dir, overrides), console=console, resume_dir=run_dir)

    def _new_run_dir(self) -> Path:
        """Rank 0 picks the run directory and tells the others (they must agree on one)."""
        chosen = [unique_run_dir(self.config.out, self.config.run_name)]
        if self.dist.enabled:
            dist.broadcast_object_list(chosen, src=0)
        return Path(chosen[0])

    def _check_int8_products(self) -> None:
        """Refuse --int8-products, with one line, where it would not run as asked."""
        require_int8(self.device, "--int8-products", "train without it")
        if self.precision.name != "32":
            raise ValueError(f"--int8-products: float32 training only (--precision 32), not {self.precision.name}")
        if self.config.direct_convolutions:
            raise ValueError("--int8-products runs on the training route of the convolutions; drop --direct-convolutions")

    def _int8_products(self) -> bool:
        """--int8-products / --no-int8-products as given; unset, `--precision auto`'s choice: on
        where auto trains in float32 (no native bf16) on a CPU with VNNI or AMX, on the training
        route, for a model with 1x1 convolutions large enough to take them. Like bf16 on a bf16
        processor, not exact: --precision 32 keeps float32 throughout."""
        config = self.config
        if config.int8_products is not None:
            return config.int8_products
        return (config.precision == "auto" and self.precision.name == "32" and self.device.type == "cpu"
                and not config.direct_convolutions and cpu_runs_int8() and self._int8_candidates() != (0, 0))

    def _int8_candidates(self) -> tuple[int, int]:
        """(1x1 convolutions, atrous convolutions) whose products int8 may take."""
        return int8_pointwise_candidates(self.model), int8_window_candidates(self.model)

    def _int8_products_line(self) -> str:
        """What --int8-products changes in this model: how many convolutions take it, or that
        none does (the flag is then a no-op, which the user should hear about)."""
        pointwise, atrous = self._int8_candidates()
        if pointwise or atrous:
            why = "" if self.config.int8_products else (
                "; --precision auto on a CPU with int8 but not bf16 products, --precision 32 for float32 throughout")
            taken = " and ".join(([f"{pointwise} 1x1 convolutions"] if pointwise else [])
                                 + ([f"{atrous} atrous convolutions' windows"] if atrous else []))
            return (f"int8 products: {taken} (forward and input gradient in int8, "
                    f"weight gradients in float32{why})")
        return (f"[yellow]warning:[/] --int8-products: none of {self.config.model}'s convolutions is a 1x1 or atrous "
                f"convolution with C_in x C_out >= {MIN_PRODUCT_CHANNELS:,}; it trains in float32 throughout")

    def _tensorboard_writer_class(self) -> type:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard (or seglab[tensorboard])") from None
        return SummaryWriter

    def _data_options(self, train: bool) -> dict[str, Any]:
        config = self.config
        if config.data == "synthetic":
            options: dict[str, Any] = {
                "num_samples": config.train_samples if train else config.val_samples,
                "image_size": config.image_size if config.image_size is not None else 64,
                "seed": config.seed,
            }
            if config.num_classes is not None:
                options["num_classes"] = config.num_classes
            return options
        return {"format": config.format, "image_size": config.image_size, "augment": config.augment if train else None}

    def _class_weights(self) -> list[float] | None:
        """Per-class loss weights: a list from the config, or median frequency balancing."""
        weights = self.config.class_weights
        if weights is None:
            return None
        if isinstance(weights, str):
            if weights != "median_frequency":
                raise ValueError(f"class_weights must be a list of numbers or 'median_frequency', not {weights!r}")
            computed = median_frequency_weights(self.train_set)
            self.console.print("median frequency class weights: " + ", ".join(f"{w:.3f}" for w in computed))
            return computed
        return [float(w) for w in weights]

    def _build_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        fused = optimizer_options(config.optimizer, self.device)  # one kernel per step, not one per tensor
        if config.optimizer == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, **fused)
        return torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fused)

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (batches divided by gradient accumulation, rounded up)."""
        return max(1, math.ceil(len(self.train_loader) / self.config.accumulate))

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        return build_scheduler(self.optimizer, self.config, self.steps_per_epoch)

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and saved: the EMA weights when enabled, else the trained ones."""
        return self.ema.module if self.ema is not None else self.model

    def _loss(self, output: torch.Tensor | dict[str, Any], target: torch.Tensor) -> torch.Tensor:
        """Main loss plus `aux_weight` times each auxiliary (deep supervision) loss, in float32
        (bf16 logits go as they are to a loss that upcasts them itself: no float32 copy)."""
        loss = self.loss_fn(float32_logits_for(self.loss_fn, logits_of(output)), target)
        if isinstance(output, dict):
            for aux in output.get("aux", []):
                if aux.shape[-2:] != target.shape[-2:]:
                    aux = F.interpolate(aux, size=target.shape[-2:], mode="bilinear", align_corners=False)
                loss = loss + self.config.aux_weight * self.loss_fn(float32_logits_for(self.loss_fn, aux), target)
        return loss

    def checkpoint_config(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "task": self.config.task,
            "model": self.config.model,
            "kwargs": self.model_kwargs,
            "classes": list(self.train_set.classes),
            "palette": [list(c) for c in self.train_set.palette],
            "ignore_index": self.ignore_index,
            "mean": list(self.config.mean),
            "std": list(self.config.std),
            "image_size": self.config.image_size,
            "data": {"source": self.config.data, **self._data_options(train=False)},
            "epoch": epoch,
            "metrics": {k: _json_safe(v) for k, v in metrics.items() if k != "confusion_matrix"},
            # the arithmetic the weights were trained in, as resolved on this machine (`auto` is not a record)
            "training": {"precision": self.precision.name, "int8_products": self.int8_products},
        }

    # ------------------------------------------------------------------ state for --resume
    def _training_state(self, epoch: int) -> dict[str, Any]:
        elapsed = self.elapsed_before + time.perf_counter() - self.fit_start
        return {**run_state(self, epoch, elapsed), "ema": self.ema.state_dict() if self.ema is not None else None}

    def _load_state(self, state: dict[str, Any]) -> None:
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        restore_run_state(self, state, self.steps_per_epoch)

    # ------------------------------------------------------------------------ the run dir
    def _check_run_dir(self) -> str | None:
        """Create (or, resuming, reopen) the run directory; a reason when it cannot take the run."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=self.resumed)
            probe = self.run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            return f"cannot write the run directory {self.run_dir}: {error.strerror or error}"
        # Two checkpoints, the resume state (weights, optimiser moments, EMA) and small files.
        weight_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        needed = 8 * weight_bytes + 20 * 2**20
        free = shutil.disk_usage(self.run_dir).free
        if free < needed:
            return f"not enough free disk space for the run directory {self.run_dir}: {free / 2**20:.0f} MiB free, about {needed / 2**20:.0f} MiB needed"
        return None

    def _prepare_run_dir(self) -> None:
        """Fail before training starts, on every rank, when rank 0 cannot write the run."""
        problem = self._check_run_dir() if self.dist.is_main else None
        if agree(problem is not None):
            raise ValueError(problem or "rank 0 cannot write the run directory")
        if self.dist.is_main:
            for stale in self.run_dir.glob(".*.tmp"):  # half-written files of a killed run
                stale.unlink()
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
            # metrics.jsonl may hold a line past the saved state when the run was killed in between.
            lines = "".join(json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n" for row in self.history)
            atomic_write_text(self.run_dir / "metrics.jsonl", lines)

    # ---------------------------------------------------------------------------- training
    def _stop_on_bad_loss(self, loss: torch.Tensor, epoch: int, batch: int) -> None:
        bad = not bool(torch.isfinite(loss.detach()))
        if self.dist.enabled:
            bad = agree(bad)
        if bad:
            kept = (
                f"the last good checkpoint is {self.run_dir / 'last'} (epoch {len(self.history) and self.history[-1]['epoch']})"
                if self.history else "no checkpoint was written yet"
            )
            raise FloatingPointError(
                f"the training loss became {float(loss.detach())} in epoch {epoch}, batch {batch + 1}; training stopped and {kept}. "
                "Lower --lr or set --clip-grad-norm"
            )

    def _optimizer_step(self) -> None:
        scaler = self.precision.scaler
        if self.config.clip_grad_norm is not None:
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad_norm)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)

    def train_one_epoch(self, progress: Progress, epoch: int) -> tuple[float, float]:
        """One pass over the training set; returns (mean loss, images per second, all processes)."""
        self.train_model.train()
        self.sampler.set_epoch(epoch)  # a new, rank-consistent shuffle every epoch
        batches, accumulate = len(self.train_loader), self.config.accumulate
        task = progress.add_task(f"epoch {epoch}/{self.config.epochs}", total=batches, info="")
        loss_sum, images_seen, start = 0.0, 0, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for index, batch in enumerate(self.train_loader):
            raise_if_interrupted()
            images = self.normalize(batch["image"].to(self.device, non_blocking=True))
            target = batch["mask"].to(self.device, non_blocking=True)
            group_start = index - index % accumulate
            group_size = min(accumulate, batches - group_start)
            steps_now = index == group_start + group_size - 1
            # Between optimiser steps, DDP need not average gradients: skip the all-reduce.
            no_sync = self.train_model.no_sync() if self.dist.enabled and not steps_now else contextlib.nullcontext()
            with no_sync:
                with self.precision.autocast(), self.convolutions, self.norms, self.attention, self.mix_ffn:
                    output = self.train_model(images)
                loss = self._loss(output, target)
                self._stop_on_bad_loss(loss, epoch, index)
                self.precision.scaler.scale(loss / group_size).backward()
            if steps_now:
                self._optimizer_step()
            loss_sum += float(loss.detach()) * images.shape[0]
            images_seen += images.shape[0]
            speed = images_seen * self.dist.world_size / (time.perf_counter() - start)
            progress.update(task, advance=1, info=f"loss {loss_sum / images_seen:.4f}  {speed:.1f} img/s")
        progress.remove_task(task)
        seconds = time.perf_counter() - start
        totals = all_reduce_sum(torch.tensor([loss_sum, float(images_seen)], dtype=torch.float64))
        return float(totals[0] / max(1.0, float(totals[1]))), float(totals[1]) / seconds

    def _save_epoch(self, epoch: int, results: dict[str, Any], row: dict[str, Any], improved: bool, writer: Any) -> None:
        """Rank 0: checkpoints, then the resume state, then the logs (a crash in between is harmless)."""
        save_checkpoint(self.run_dir / "last", self.eval_model, self.checkpoint_config(epoch, results))
        if improved:
            save_checkpoint(self.run_dir / "best", self.eval_model, self.checkpoint_config(epoch, results))
        append_line(self.run_dir / "metrics.jsonl", json.dumps({k: _json_safe(v) for k, v in row.items()}))
        plot_curves(self.history, self.run_dir / "curves.png")
        if writer is not None:
            for key in ("train_loss", "val_loss", *SUMMARY_KEYS, "lr", "train_images_per_second"):
                if isinstance(row.get(key), float):
                    writer.add_scalar(key, row[key], epoch)
            writer.flush()
        save_training_state(self.run_dir, self._training_state(epoch))

    def fit(self) -> dict[str, Any]:
        """Train, evaluate every epoch, keep the best checkpoint by validation mIoU."""
        config = self.config
        self._prepare_run_dir()
        processes = f" x {self.dist.world_size} processes" if self.dist.enabled else ""
        self.console.print(
            f"Training [bold]{config.model}[/] on {config.data} ({len(self.train_set)} train / {len(self.val_set)} val images, "
            f"{self.num_classes} classes) on {self.device}{processes}, precision {self.precision.name}; run directory {self.run_dir}"
        )
        if self.int8_products:  # asked for, or auto's choice
            self.console.print(self._int8_products_line())
        if self.resumed:
            self.console.print(f"resuming after epoch {self.start_epoch} of {config.epochs}")
        writer = self.summary_writer_class(str(self.run_dir / "tensorboard")) if self.summary_writer_class and self.dist.is_main else None
        self.fit_start = time.perf_counter()
        try:
            with progress_bar(self.console, disable=not self.dist.is_main) as progress:
                for epoch in range(self.start_epoch + 1, config.epochs + 1):
                    if self._run_epoch(progress, epoch, writer):
                        break
        finally:
            if writer is not None:
                writer.close()
        return self._finish()

    def _run_epoch(self, progress: Progress, epoch: int, writer: Any) -> bool:
        """Train and evaluate one epoch, save it; True when the run should stop now."""
        config = self.config
        epoch_start = time.perf_counter()
        train_loss, speed = self.train_one_epoch(progress, epoch)
        results = evaluate(
            self.eval_model, self.val_loader, num_classes=self.num_classes, ignore_index=self.ignore_index,
            normalize=self.normalize, device=self.device, loss_fn=self.loss_fn, autocast=self.precision.autocast,
        )
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": results["loss"],
            **{k: results[k] for k in SUMMARY_KEYS},
            "iou": _json_safe(results["iou"]),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_images_per_second": speed,
            "epoch_seconds": time.perf_counter() - epoch_start,
        }
        self.history.append(row)
        improved = self.best is None or results["miou"] > self.best["miou"]
        if improved:
            self.best = {"epoch": epoch, **{k: v for k, v in results.items() if k != "confusion_matrix"}}
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        self.console.print(
            f"epoch {epoch}: train loss {train_loss:.4f}  val loss {results['loss']:.4f}  "
            f"mIoU {results['miou']:.4f}  pixel acc {results['pixel_accuracy']:.4f}"
        )
        # Fitted before the save, so resume.pt holds the curve the next epoch follows.
        last_within_budget = config.fit_to_budget and end_schedule_within_budget(
            self.scheduler, config, self.steps_per_epoch, epoch, row["epoch_seconds"],
            self.elapsed_before + time.perf_counter() - self.fit_start, self.console,
        )
        if self.dist.is_main:
            self._save_epoch(epoch, results, row, improved, writer)
        if config.patience is not None and self.epochs_without_improvement >= config.patience:
            self.console.print(f"early stop: no better mIoU for {config.patience} epoch(s) (best {self.best['miou']:.4f} at epoch {self.best['epoch']})")
            return True
        elapsed = self.elapsed_before + time.perf_counter() - self.fit_start
        # Ranks' clocks differ slightly; they must still stop after the same epoch.
        if agree(config.max_minutes is not None and elapsed > 60 * config.max_minutes):
            self.console.print(f"time budget of {config.max_minutes} min reached after epoch {epoch}")
            return True
        return last_within_budget

    def _finish(self) -> dict[str, Any]:
        """Load the best weights, write overlays (rank 0) and summarise the run."""
        if self.best is None:
            raise ValueError(f"the run in {self.run_dir} has no finished epoch to report")
        best = self.best
        stores_int8 = self._stores_int8_ranges()
        if stores_int8:  # every rank scores int8 on its shard of the validation split, with the best weights
            barrier()  # rank 0 has written them
        if self.dist.is_main or stores_int8:
            self.model.load_state_dict(load_file(str(self.run_dir / "best.safetensors"), device=str(self.device)))
        if stores_int8:
            self._store_int8_ranges()
        if self.dist.is_main:
            self.save_overlays(self.run_dir / "overlays")
            shown = {k: v for k, v in best.items() if k != "epoch"}
            self.console.print(format_report(shown, self.train_set.classes, title=f"Validation, best epoch {best['epoch']}"))
        return {
            "run_dir": str(self.run_dir),
            "best_epoch": best["epoch"],
            "epochs_run": len(self.history),
            "seconds": self.elapsed_before + time.perf_counter() - self.fit_start,
            **{k: best[k] for k in SUMMARY_KEYS},
        }

    def _stores_int8_ranges(self) -> bool:
        """Runs on a CPU with int8 products (a GPU run's checkpoint is scored by
        `seglab eval --store-int8-ranges` on the CPU that will run it)."""
        return self.config.int8_calibration and self.device.type == "cpu" and cpu_runs_int8()

    def _store_int8_ranges(self) -> None:
        """Calibrate the best weights for int8 inference, score them on the validation split
        (every rank its shard) and add the record to best.json (rank 0; seglab.engine.int8_checkpoint)."""
        # the train split without random augmentation: the images `seglab eval --precision int8` takes
        options = self._data_options(train=False)
        if self.config.data != "synthetic":
            options["augment"] = False  # None would mean the training default on the train split
        calibration_set = open_dataset(self.config.data, "train", **options)
        calibration = calibration_images(calibration_set, self.normalize, device=self.device)
        miou_float32 = self.best["miou"]
        if self.precision.name != "32":  # the figure to compare with is float32's
            miou_float32 = evaluate(self.model, self.val_loader, num_classes=self.num_classes, ignore_index=self.ignore_index,
                                    normalize=self.normalize, device=self.device)["miou"]
        record = measure_int8(self.model, calibration, self.val_loader, num_classes=self.num_classes,
                              ignore_index=self.ignore_index, normalize=self.normalize, miou_float32=miou_float32)
        if record is None or not self.dist.is_main:
            return
        update_checkpoint_config(self.run_dir / "best", int8=record.to_json())
        default = auto_inference_precision(self.device, record, self.model)
        if default == "int8":
            verdict = "`seglab predict` runs int8 by default on this CPU"
        elif record.within():  # a processor with native bfloat16 keeps it by default
            verdict = f"`seglab predict` runs {default} by default here, `--precision int8` these ranges"
        else:
            verdict = f"more than {100 * AUTO_TOLERANCE:.1f} points off: `seglab predict` keeps {default} by default"
        self.console.print(f"int8 inference checked: validation mIoU {record.miou_int8:.4f} against {record.miou_float32:.4f} "
                           f"in float32 ({len(record.ranges)} convolutions, {record.images} calibration images); {verdict}")

    @torch.inference_mode()
    def save_overlays(self, folder: Path) -> None:
        """Image | ground truth | prediction for the first few validation images."""
        self.model.eval()
        for index in range(min(self.config.num_overlays, len(self.val_set))):
            sample = self.val_set[index]
            image = sample["image"]
            with self.precision.autocast():
                logits = logits_of(self.model(self.normalize(image[None].to(self.device))))
            prediction = class_indices(logits.float())[0].cpu()
            panel = prediction_panel(image, sample["mask"], prediction, self.train_set.palette)
            atomic_write_png(folder / f"val_{index:03d}.png", panel, compress_level=PICTURE_COMPRESS_LEVEL)
