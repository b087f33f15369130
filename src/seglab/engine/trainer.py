"""The training loop: plain PyTorch, one epoch of training then one evaluation pass.

A run directory `<out>/<name>/` receives the config (YAML), `last` and `best` checkpoints
(safetensors + JSON), `metrics.jsonl` (one line per epoch), `curves.png` and overlay PNGs of a
few validation predictions next to their ground truth.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from seglab.data import open_dataset
from seglab.engine.checkpoint import save_checkpoint
from seglab.engine.config import TrainConfig
from seglab.engine.evaluator import Normalize, evaluate, logits_of
from seglab.engine.report import metrics_table
from seglab.files import append_line, atomic_write, atomic_write_text
from seglab.models import create_model
from seglab.viz import plot_curves, prediction_panel

__all__ = ["Trainer", "seed_everything", "resolve_device", "progress_bar", "unique_run_dir"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def progress_bar(console: Console) -> Progress:
    """The progress bar used everywhere: description, bar, count, extra fields, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )


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


class Trainer:
    """Builds data, model and optimiser from a :class:`TrainConfig` and runs `fit()`."""

    def __init__(self, config: TrainConfig, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console(stderr=True)
        seed_everything(config.seed)
        self.device = resolve_device(config.device)
        self.train_set = open_dataset(config.data, "train", **self._data_options(train=True))
        self.val_set = open_dataset(config.data, "val", **self._data_options(train=False))
        self.num_classes = self.train_set.num_classes
        self.ignore_index = self.train_set.ignore_index
        self.model_kwargs = {**config.model_kwargs, "num_classes": self.num_classes, "in_channels": self.train_set.in_channels}
        if config.encoder:
            self.model_kwargs["encoder"] = config.encoder
        self.model = create_model(config.model, **self.model_kwargs).to(self.device)
        self.normalize = Normalize(config.mean, config.std).to(self.device)
        self.loss_fn = self._build_loss()
        generator = torch.Generator().manual_seed(config.seed)
        self.train_loader = DataLoader(
            self.train_set,
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=len(self.train_set) > config.batch_size,
            num_workers=config.workers,
            generator=generator,
            persistent_workers=config.workers > 0,
        )
        self.val_loader = DataLoader(self.val_set, batch_size=config.batch_size, num_workers=config.workers)
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.run_dir = unique_run_dir(config.out, config.run_name)

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

    def _build_loss(self) -> nn.Module:
        weights = self.config.class_weights
        if isinstance(weights, str):
            raise ValueError(f"class_weights {weights!r} is not supported yet; give a list of numbers")
        weight = torch.tensor(weights, dtype=torch.float32, device=self.device) if weights else None
        if weight is not None and weight.numel() != self.num_classes:
            raise ValueError(f"class_weights has {weight.numel()} values for {self.num_classes} classes")
        return nn.CrossEntropyLoss(weight=weight, ignore_index=self.ignore_index)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        if config.optimizer == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
        return torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        """Per-iteration schedule: linear warm-up, then cosine, poly (power 0.9) or constant."""
        config = self.config
        total = max(1, config.epochs * len(self.train_loader))
        warmup = int(config.warmup_epochs * len(self.train_loader))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if config.scheduler == "cosine":
                return 0.5 * (1 + math.cos(math.pi * progress))
            if config.scheduler == "poly":
                return (1 - progress) ** 0.9
            return 1.0

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def _loss(self, output: torch.Tensor | dict[str, Any], target: torch.Tensor) -> torch.Tensor:
        """Main loss plus `aux_weight` times each auxiliary (deep supervision) loss."""
        loss = self.loss_fn(logits_of(output), target)
        if isinstance(output, dict):
            for aux in output.get("aux", []):
                if aux.shape[-2:] != target.shape[-2:]:
                    aux = F.interpolate(aux, size=target.shape[-2:], mode="bilinear", align_corners=False)
                loss = loss + self.config.aux_weight * self.loss_fn(aux, target)
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
        }

    def _prepare_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise ValueError(f"cannot write the run directory {self.run_dir}: {error.strerror or error}") from None
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))

    def train_one_epoch(self, progress: Progress, epoch: int) -> tuple[float, float]:
        """One pass over the training set; returns (mean loss, images per second)."""
        self.model.train()
        task = progress.add_task(f"epoch {epoch}/{self.config.epochs}", total=len(self.train_loader), info="")
        loss_sum, images_seen, start = 0.0, 0, time.perf_counter()
        for batch in self.train_loader:
            images = self.normalize(batch["image"].to(self.device, non_blocking=True))
            target = batch["mask"].to(self.device, non_blocking=True)
            loss = self._loss(self.model(images), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss became {float(loss)} in epoch {epoch}; lower --lr (the last good checkpoint is kept)")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += float(loss) * images.shape[0]
            images_seen += images.shape[0]
            speed = images_seen / (time.perf_counter() - start)
            progress.update(task, advance=1, info=f"loss {loss_sum / images_seen:.4f}  {speed:.1f} img/s")
        progress.remove_task(task)
        return loss_sum / max(1, images_seen), images_seen / (time.perf_counter() - start)

    def fit(self) -> dict[str, Any]:
        """Train, evaluate every epoch, keep the best checkpoint by validation mIoU."""
        config = self.config
        self._prepare_run_dir()
        self.console.print(
            f"Training [bold]{config.model}[/] on {config.data} ({len(self.train_set)} train / {len(self.val_set)} val images, "
            f"{self.num_classes} classes) on {self.device}; run directory {self.run_dir}"
        )
        history: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        best_state: dict[str, torch.Tensor] | None = None
        start = time.perf_counter()
        with progress_bar(self.console) as progress:
            for epoch in range(1, config.epochs + 1):
                epoch_start = time.perf_counter()
                train_loss, speed = self.train_one_epoch(progress, epoch)
                results = evaluate(
                    self.model, self.val_loader, num_classes=self.num_classes, ignore_index=self.ignore_index,
                    normalize=self.normalize, device=self.device, loss_fn=self.loss_fn,
                )
                row = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": results["loss"],
                    **{k: results[k] for k in ("pixel_accuracy", "mean_accuracy", "miou", "mdice", "fwiou")},
                    "iou": _json_safe(results["iou"]),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "train_images_per_second": speed,
                    "epoch_seconds": time.perf_counter() - epoch_start,
                }
                history.append(row)
                append_line(self.run_dir / "metrics.jsonl", json.dumps({k: _json_safe(v) for k, v in row.items()}))
                save_checkpoint(self.run_dir / "last", self.model, self.checkpoint_config(epoch, results))
                if best is None or results["miou"] > best["miou"]:
                    best = {**results, "epoch": epoch}
                    best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    save_checkpoint(self.run_dir / "best", self.model, self.checkpoint_config(epoch, results))
                plot_curves(history, self.run_dir / "curves.png")
                self.console.print(
                    f"epoch {epoch}: train loss {train_loss:.4f}  val loss {results['loss']:.4f}  "
                    f"mIoU {results['miou']:.4f}  pixel acc {results['pixel_accuracy']:.4f}"
                )
                if config.max_minutes is not None and time.perf_counter() - start > 60 * config.max_minutes:
                    self.console.print(f"time budget of {config.max_minutes} min reached after epoch {epoch}")
                    break
        assert best is not None and best_state is not None
        self.model.load_state_dict(best_state)
        self.save_overlays(self.run_dir / "overlays")
        seconds = time.perf_counter() - start
        summary = {
            "run_dir": str(self.run_dir),
            "best_epoch": best["epoch"],
            "epochs_run": len(history),
            "seconds": seconds,
            **{k: best[k] for k in ("pixel_accuracy", "mean_accuracy", "miou", "mdice", "fwiou")},
        }
        self.console.print(metrics_table(best, self.train_set.classes, title=f"Validation, best epoch {best['epoch']}"))
        return summary

    @torch.inference_mode()
    def save_overlays(self, folder: Path) -> None:
        """Image | ground truth | prediction for the first few validation images."""
        self.model.eval()
        for index in range(min(self.config.num_overlays, len(self.val_set))):
            sample = self.val_set[index]
            image = sample["image"]
            logits = logits_of(self.model(self.normalize(image[None].to(self.device))))
            prediction = logits.argmax(1)[0].cpu()
            panel = prediction_panel(image, sample["mask"], prediction, self.train_set.palette)
            atomic_write(folder / f"val_{index:03d}.png", lambda tmp, p=panel: Image.fromarray(p).save(tmp, format="PNG"))
