"""Training and evaluation for instance segmentation models (Mask R-CNN, YOLACT); prediction
is seglab.engine.instance_predictor's.

The same run directory as semantic training (config.yaml, best/last checkpoints as safetensors
+ JSON, metrics.jsonl, curves.png, overlays/), the same options (:class:`TrainConfig`), progress
bar and checkpoint helpers as :mod:`seglab.engine.trainer`; what differs is the data (lists of
images and target dicts), the model's own loss dict, and the validation metric: COCO mask AP
(pycocotools, through :class:`seglab.metrics.COCOMaskEvaluator`), the best checkpoint being the
one with the highest mask AP.

Models normalise their input themselves (torchvision's convention), so images reach them
in [0, 1] and the checkpoint's mean/std are informative only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from seglab.data.box_stats import ANCHOR_PERCENTILE, anchor_size_for, object_sides
from seglab.data.copy_paste import CopyPaste
from seglab.data.instance import collate_instances, instance_augment_options, instance_transforms, open_instance_dataset
from seglab.engine.checkpoint import check_data_classes, save_checkpoint
from seglab.engine.config import TrainConfig
from seglab.engine.fastpath import optimize_instance_model, to_channels_last, training_convolutions
from seglab.engine.instance_predictor import instance_overlay, sorted_detections
from seglab.engine.precision import resolve_precision
from seglab.engine.state import load_training_state, save_training_state
from seglab.engine.trainer import (
    _json_safe,
    build_scheduler,
    end_schedule_within_budget,
    progress_bar,
    resolve_device,
    restore_run_state,
    resumed_config,
    run_state,
    seed_everything,
    unique_run_dir,
    use_deterministic_kernels,
)
from seglab.files import PICTURE_COMPRESS_LEVEL, append_line, atomic_write_png, atomic_write_text
from seglab.interrupts import raise_if_interrupted
from seglab.metrics import COCOMaskEvaluator, save_coco_results
from seglab.metrics.coco import coco_results
from seglab.models import create_model
from seglab.viz import plot_curves

__all__ = [
    "INSTANCE_DEFAULTS",
    "InstanceTrainer",
    "eval_instance",
    "evaluate_instances",
    "instance_metrics_table",
    "model_kwargs_for",
    "train_instance",
]

# What `seglab train --task instance` uses where the command line and config say nothing:
# a small, CPU-friendly recipe on the synthetic shapes at 128x128.
INSTANCE_DEFAULTS: dict[str, Any] = {
    "task": "instance",
    "model": "mask_rcnn",
    "encoder": "resnet18",
    "model_kwargs": {},
    "image_size": 128,
    "train_samples": 1000,
    "val_samples": 100,
    "epochs": 12,
    "batch_size": 8,
    "lr": 5e-4,
    "weight_decay": 1e-4,
    "warmup_epochs": 0.5,
    "scheduler": "cosine",
    "num_overlays": 4,
}

_METRIC_KEYS = ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar", "boundary_ap", "boundary_ap50", "boundary_ap75")
_TABLE_COLUMNS = {"ap": "mask AP", "ap50": "AP50", "ap75": "AP75", "aps": "APs", "apm": "APm", "apl": "APl", "ar": "AR",
                  "boundary_ap": "boundary AP"}


def model_kwargs_for(model: str, image_size: int | Sequence[int] | None, user_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Sizes suited to the data: no internal resizing, anchors scaled to the image size.

    The papers' anchors suit 800-pixel (Mask R-CNN) and 550-pixel (YOLACT) inputs; here images
    keep their own size, so the smallest anchor follows the training size (side / 8 for Mask
    R-CNN's P2, side / 6 for YOLACT's P3, clamped to at least 8 pixels). The user's kwargs win.
    :class:`InstanceTrainer` then replaces YOLACT's by one fitted to the training boxes
    (:mod:`seglab.data.box_stats`) unless the user gave one.
    """
    side = min(image_size) if isinstance(image_size, (list, tuple)) else (image_size or 512)
    defaults: dict[str, Any] = {}
    if model in ("mask_rcnn", "keypoint_rcnn"):
        defaults = {"min_size": 0, "anchor_size": max(8, side // 8), "proposals": 300, "rois_per_image": 128}
    elif model == "yolact":
        defaults = {"anchor_size": max(8, side // 6)}
    return {**defaults, **user_kwargs}


class InstanceTrainer:
    """Builds instance data, model and optimiser from a :class:`TrainConfig` and runs `fit()`.

    Single process; AdamW or SGD (momentum 0.9), per-iteration linear warm-up then cosine,
    poly or constant learning rate, gradient norm clipped at 10 (detection losses spike early).

    What is the task's own (the data, its augmentation, the validation metric and its words,
    the overlays) sits in the methods below ``fit``'s loop, so that
    :class:`seglab.engine.keypoints.KeypointTrainer` trains Keypoint R-CNN through the same loop.
    """

    task = "instance"
    metric_keys: tuple[str, ...] = _METRIC_KEYS
    score_name = "mask AP"  # the figure the best checkpoint and --patience follow (results["ap"])
    table_columns = _TABLE_COLUMNS  # key -> heading of the validation table
    headline_keys = ("ap", "ap50", "boundary_ap")  # the figures of each epoch's line

    def __init__(self, config: TrainConfig, console: Console | None = None, clock: Callable[[], float] = time.perf_counter,
                 resume_dir: str | Path | None = None) -> None:
        _refuse_semantic_only_options(config)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("instance training runs in one process; data-parallel training (--nproc, torchrun) is for semantic models")
        self.config = config
        # Detection losses spike early on: clipped at 10 unless --clip-grad-norm says otherwise.
        self.clip_grad_norm = config.clip_grad_norm if config.clip_grad_norm is not None else 10.0
        self.console = console or Console(stderr=True)
        self.clock = clock  # what --max-minutes measures: wall time, or e.g. time.process_time
        seed_everything(config.seed)
        self.device = resolve_device(config.device)
        if config.deterministic:
            use_deterministic_kernels(self.device)
        crop = config.image_size if config.data != "synthetic" and isinstance(config.image_size, int) else None
        augment = instance_augment_options(config.augment)
        self.train_set = self._open_training_data(augment, crop)
        # a COCO file's category ids of labels 1..K, so that predictions can be written in the file's ids
        category_of_label = getattr(self.train_set, "category_of_label", None)
        self.category_ids = [category_of_label[label] for label in sorted(category_of_label)] if category_of_label else None
        if augment and augment.get("copy_paste"):
            self.train_set = CopyPaste(self.train_set, augment["copy_paste"])
        self.val_set = self._open_data("val", None)
        if config.data != "synthetic" and config.val_samples < len(self.val_set):
            # Per-epoch validation on the first `val_samples` images keeps epochs affordable on
            # large real images; `seglab eval` measures the whole split afterwards.
            self.val_set = _Head(self.val_set, config.val_samples)
        self.num_classes = self.train_set.num_classes
        self.model_kwargs = {
            **model_kwargs_for(config.model, config.image_size, config.model_kwargs),
            "num_classes": self.num_classes,
            "in_channels": 3,
            **self._model_kwargs_from_data(),
        }
        self.anchor_note = ""
        if config.model == "yolact" and "anchor_size" not in config.model_kwargs:
            self._fit_anchors_to_data()
        if config.encoder:
            self.model_kwargs["encoder"] = config.encoder
        self.precision = resolve_precision(config.precision, self.device)
        # channels_last: oneDNN's / cuDNN's native layout, kept through the backbone and heads
        self.model = to_channels_last(create_model(config.model, **self.model_kwargs).to(self.device))
        # Winograd's 3x3 convolutions on the CPU (the FPN's, the RPN's and the mask head's, where
        # the input pays; under bf16 autocast the widest, by F(2x2)), unless asked not to;
        # entered at each step.
        self.convolutions = training_convolutions(self.model, self.device, self.precision.name,
                                                  enabled=not config.direct_convolutions,
                                                  deterministic=config.deterministic)
        self.generator = generator = torch.Generator().manual_seed(config.seed)
        self.train_loader = DataLoader(
            self.train_set, batch_size=config.batch_size, shuffle=True, drop_last=len(self.train_set) > config.batch_size,
            num_workers=config.workers, generator=generator, collate_fn=collate_instances, persistent_workers=config.workers > 0,
        )
        self.val_loader = DataLoader(self.val_set, batch_size=config.batch_size, num_workers=config.workers, collate_fn=collate_instances)
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.start_epoch, self.elapsed_before, self.epochs_without_improvement = 0, 0.0, 0
        self.resumed = resume_dir is not None
        self.run_dir = Path(resume_dir) if resume_dir is not None else unique_run_dir(config.out, config.run_name)
        if resume_dir is not None:
            self._load_state(load_training_state(resume_dir))

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict[str, Any] | None = None, console: Console | None = None) -> "InstanceTrainer":
        """Continue the run in `run_dir` after its last finished epoch (as `Trainer.resume`)."""
        return cls(resumed_config(run_dir, overrides), console=console, resume_dir=run_dir)

    def _training_state(self, epoch: int, elapsed: float) -> dict[str, Any]:
        # and the generator of the training order, for the epochs to come
        return {**run_state(self, epoch, elapsed), "shuffle": self.generator.get_state()}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["shuffle"])
        restore_run_state(self, state, len(self.train_loader))

    # --- the task's own parts: instance segmentation's here, keypoints' in KeypointTrainer ---

    @staticmethod
    def open_dataset(source: str, split: str, *, transforms: Any = None, **options: Any) -> torch.utils.data.Dataset:
        """The task's data set by name or path (`seglab eval` opens checkpoints' data through it)."""
        return open_instance_dataset(source, split, transforms=transforms, **options)

    @staticmethod
    def evaluator(described: dict[str, Any]) -> Any:
        """The task's streaming COCO evaluator; `described` is what a checkpoint's config says of
        the data (classes, and for keypoints their names and OKS constants)."""
        return COCOMaskEvaluator(list(described["classes"]))

    records_of = staticmethod(coco_results)  # the task's COCO results records of predictions and image ids

    @classmethod
    def score(cls, model: nn.Module, loader: DataLoader, described: dict[str, Any], device: torch.device | str,
              progress: Progress | None = None, results_json: str | Path | None = None,
              autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, Any]:
        """The task's validation figures of `model` on `loader` (:func:`evaluate_detections`)."""
        return evaluate_detections(model, loader, cls.evaluator(described), cls.records_of, device, progress, results_json,
                                   autocast)

    @classmethod
    def results_table(cls, results: dict[str, Any], title: str) -> Table:
        return metrics_table(results, cls.table_columns, title)

    @classmethod
    def figures_words(cls, results: dict[str, Any]) -> str:
        """The figures an epoch's line and the run's last line print."""
        return "  ".join(f"{cls.table_columns[key]} {results[key]:.4f}" for key in cls.headline_keys)

    def _open_data(self, split: str, transforms: Any) -> torch.utils.data.Dataset:
        return self.open_dataset(self.config.data, split, transforms=transforms, **self._data_options(train=split == "train"))

    def _open_training_data(self, augment: dict[str, Any] | None, crop: int | None) -> torch.utils.data.Dataset:
        """The train split, augmented by `augment` (:func:`instance_augment_options`'s, or None)."""
        transforms = None if augment is None else instance_transforms(True, crop, scale=augment["scale"])
        return self._open_data("train", transforms)

    def _model_kwargs_from_data(self) -> dict[str, Any]:
        """Builder arguments that the data set decides (beyond the number of classes)."""
        return {}

    def _data_description(self) -> dict[str, Any]:
        """What the checkpoint's config keeps about the data beyond classes and palette."""
        return {}

    def evaluate(self, progress: Progress | None = None) -> dict[str, Any]:
        """The validation figures of the model as it is (``ap`` the one the best checkpoint follows)."""
        # Validated as trained; `seglab eval` chooses its own precision.
        described = {"classes": list(self.train_set.classes), **self._data_description()}
        return self.score(self.model, self.val_loader, described, self.device, progress=progress,
                          autocast=self.precision.autocast)

    def _overlay(self, image: torch.Tensor, detections: dict[str, torch.Tensor]) -> np.ndarray:
        return instance_overlay(image, detections, self.train_set.classes)

    def _fit_anchors_to_data(self) -> None:
        """YOLACT's anchor scale from the training boxes (see :mod:`seglab.data.box_stats`); the
        image-size rule of :func:`model_kwargs_for` stays when the samples hold no objects."""
        sides = object_sides(self.train_set)
        size = anchor_size_for(sides)
        if size is not None:
            self.model_kwargs["anchor_size"] = size
            self.anchor_note = (
                f"; anchors {size} px on P3 (the {ANCHOR_PERCENTILE:g}th percentile of {len(sides)} training box sides)"
            )

    def _build_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        if config.optimizer == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
        return torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        return build_scheduler(self.optimizer, self.config, len(self.train_loader))

    def _prepare_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=self.resumed)
        except OSError as error:
            raise ValueError(f"cannot write the run directory {self.run_dir}: {error.strerror or error}") from None
        for stale in self.run_dir.glob(".*.tmp"):  # half-written files of a killed run
            stale.unlink()
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))

    def _data_options(self, train: bool) -> dict[str, Any]:
        config = self.config
        if config.data != "synthetic":
            return {"format": config.format} if config.format else {}
        options: dict[str, Any] = {
            "num_samples": config.train_samples if train else config.val_samples,
            "image_size": config.image_size or 128,
            "seed": config.seed,
        }
        if config.num_classes is not None:
            options["num_classes"] = config.num_classes
        return options

    def checkpoint_config(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "task": self.task,
            "model": self.config.model,
            "kwargs": self.model_kwargs,
            "classes": list(self.train_set.classes),
            "palette": [list(c) for c in self.train_set.palette],
            **({"category_ids": self.category_ids} if self.category_ids else {}),
            **self._data_description(),
            "mean": list(self.config.mean),
            "std": list(self.config.std),
            "image_size": self.config.image_size,
            "data": {"source": self.config.data, **self._data_options(train=False)},
            "epoch": epoch,
            "metrics": {k: _json_safe(metrics[k]) for k in self.metric_keys if k in metrics},
            # the arithmetic the weights were trained in, as resolved on this machine, as semantic runs
            # record it (instance training has no int8 products)
            "training": {"precision": self.precision.name, "int8_products": False},
        }

    def train_one_epoch(self, progress: Progress, epoch: int) -> tuple[float, float, dict[str, float]]:
        """One pass over the training set; returns (mean total loss, images per second, mean of
        each loss term by its model's name, e.g. loss_classifier), per image."""
        self.model.train()
        task = progress.add_task(f"epoch {epoch}/{self.config.epochs}", total=len(self.train_loader), info="")
        loss_sum, images_seen, start = 0.0, 0, time.perf_counter()
        term_sums: dict[str, float] = {}
        for images, targets in self.train_loader:
            raise_if_interrupted()
            images = [image.to(self.device) for image in images]
            targets = [{k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
            with self.precision.autocast(), self.convolutions:
                losses = self.model(images, targets)
            loss = sum(loss.float() for loss in losses.values())
            if not torch.isfinite(loss):
                parts = ", ".join(f"{k} {float(v):.3g}" for k, v in losses.items())
                raise FloatingPointError(f"the training loss became {float(loss)} in epoch {epoch} ({parts}); lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            scaler = self.precision.scaler  # a no-op except for float16 on CUDA
            scaler.scale(loss).backward()
            scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
            scaler.step(self.optimizer)
            scaler.update()
            self.scheduler.step()
            loss_sum += float(loss.detach()) * len(images)
            for name, term in losses.items():
                term_sums[name] = term_sums.get(name, 0.0) + float(term.detach()) * len(images)
            images_seen += len(images)
            speed = images_seen / (time.perf_counter() - start)
            progress.update(task, advance=1, info=f"loss {loss_sum / images_seen:.4f}  {speed:.1f} img/s")
        progress.remove_task(task)
        seen = max(1, images_seen)
        return loss_sum / seen, images_seen / (time.perf_counter() - start), {name: total / seen for name, total in term_sums.items()}

    def _val_words(self) -> str:
        """"132 val", or "the first 100 of 132 val" where per-epoch validation takes a head of the split."""
        if isinstance(self.val_set, _Head):
            return f"the first {len(self.val_set)} of {len(self.val_set.dataset)} val (--val-samples)"
        return f"{len(self.val_set)} val"

    def fit(self) -> dict[str, Any]:
        """Train, evaluate every epoch (COCO mask AP; OKS AP for keypoints), keep the best
        checkpoint by that AP."""
        config = self.config
        self._prepare_run_dir()
        self.console.print(
            f"Training [bold]{config.model}[/] ({self.model_kwargs.get('encoder', 'default encoder')}) on {config.data} "
            f"({len(self.train_set)} train / {self._val_words()} images, {self.num_classes - 1} object classes) "
            f"on {self.device}, precision {self.precision.name}{self.anchor_note}; run directory {self.run_dir}"
        )
        if self.resumed:
            self.console.print(f"resuming after epoch {self.start_epoch} of {config.epochs}")
        start, budget_start = time.perf_counter(), self.clock()
        with progress_bar(self.console) as progress:
            for epoch in range(self.start_epoch + 1, config.epochs + 1):
                epoch_start, epoch_budget_start = time.perf_counter(), self.clock()
                train_loss, speed, loss_terms = self.train_one_epoch(progress, epoch)
                results = self.evaluate(progress)
                budget_used = self.elapsed_before + self.clock() - budget_start
                row = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    **{f"train_{name}": value for name, value in loss_terms.items()},
                    **{k: float(results[k]) for k in self.metric_keys},
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "train_images_per_second": speed,
                    "epoch_seconds": time.perf_counter() - epoch_start,
                    "elapsed_seconds": time.perf_counter() - start,
                    "budget_seconds": budget_used,
                }
                self.history.append(row)
                append_line(self.run_dir / "metrics.jsonl", json.dumps({k: _json_safe(v) for k, v in row.items()}))
                save_checkpoint(self.run_dir / "last", self.model, self.checkpoint_config(epoch, results))
                if self.best is None or _score(results) > _score(self.best):
                    self.best = _best_record(results, epoch, self.metric_keys)
                    self.epochs_without_improvement = 0
                    save_checkpoint(self.run_dir / "best", self.model, self.checkpoint_config(epoch, results))
                else:
                    self.epochs_without_improvement += 1
                plot_curves([{**r, "miou": r["ap"]} for r in self.history], self.run_dir / "curves.png")
                self.console.print(f"epoch {epoch}: train loss {train_loss:.4f}  {self.figures_words(results)}  "
                                   f"({row['epoch_seconds']:.0f} s)")
                # Fitted before the save, so resume.pt holds the curve the next epoch follows.
                stop = config.max_minutes is not None and budget_used > 60 * config.max_minutes
                last_within_budget = not stop and config.fit_to_budget and end_schedule_within_budget(
                    self.scheduler, config, len(self.train_loader), epoch, self.clock() - epoch_budget_start,
                    budget_used, self.console,
                )
                save_training_state(self.run_dir, self._training_state(epoch, budget_used))
                if config.patience is not None and self.epochs_without_improvement >= config.patience:
                    self.console.print(f"early stop: no better {self.score_name} for {config.patience} epoch(s) "
                                       f"(best {self.best['ap']:.4f} at epoch {self.best['epoch']})")
                    break
                if stop:
                    self.console.print(f"time budget of {config.max_minutes} min reached after epoch {epoch}")
                    break
                if last_within_budget:
                    break
        assert self.best is not None  # an epoch ran, or the resumed state held one
        best = self.best
        # The best epoch's weights, from its checkpoint (a resumed run may not have trained it).
        self.model.load_state_dict(load_file(str(self.run_dir / "best.safetensors")))
        self.save_overlays(self.run_dir / "overlays")
        summary = {
            "run_dir": str(self.run_dir),
            "best_epoch": best["epoch"],
            "epochs_run": len(self.history),
            "seconds": time.perf_counter() - start,
            **{k: best[k] for k in self.metric_keys},
        }
        self.console.print(self.results_table(best, title=f"Validation, best epoch {best['epoch']}"))
        return summary

    @torch.inference_mode()
    def save_overlays(self, folder: Path) -> None:
        """Ground truth | prediction (one colour per instance) for the first few validation images."""
        self.model.eval()
        for index in range(min(self.config.num_overlays, len(self.val_set))):
            image, target = self.val_set[index]
            prediction = sorted_detections(self.model([image.to(self.device)])[0])
            truth = {**{k: v for k, v in target.items() if isinstance(v, torch.Tensor)}, "scores": torch.ones(len(target["labels"]))}
            panel = np.concatenate(
                [self._overlay(image, truth), np.full((image.shape[-2], 2, 3), 255, np.uint8), self._overlay(image, prediction)],
                axis=1,
            )
            atomic_write_png(folder / f"val_{index:03d}.png", panel, compress_level=PICTURE_COMPRESS_LEVEL)


class _Head(torch.utils.data.Subset):
    """The first `count` samples of a data set, keeping its class names and palette."""

    def __init__(self, dataset: Any, count: int) -> None:
        super().__init__(dataset, range(count))
        self.classes, self.palette = dataset.classes, dataset.palette


# Options of semantic training that instance training does not take: given, they are refused
# rather than silently ignored (instance models train with their own losses, in one process).
_SEMANTIC_ONLY = ("loss", "class_weights", "aux_weight", "ema_decay", "accumulate", "sync_bn", "tensorboard",
                  "int8_products", "native_norms", "native_attention", "native_mix_ffn")


def _refuse_semantic_only_options(config: TrainConfig) -> None:
    defaults = {option.name: option.default for option in dataclasses.fields(TrainConfig)}
    for name in _SEMANTIC_ONLY:
        if getattr(config, name) != defaults[name]:
            raise ValueError(f"--{name.replace('_', '-')} is an option of semantic training; instance training does not take it "
                             "(instance models train with their own losses, in one process)")


def _best_record(results: dict[str, Any], epoch: int, keys: Sequence[str]) -> dict[str, Any]:
    """The best epoch's figures as plain floats (what resume.pt can hold and the table prints)."""
    per_class = {str(name): float(value) for name, value in (results.get("ap_per_class") or {}).items()}
    return {"epoch": epoch, **{k: float(results[k]) for k in keys}, "ap_per_class": per_class}


def _score(results: dict[str, Any]) -> float:
    """Mask AP, with NaN (nothing to evaluate yet) below every number."""
    return -1.0 if math.isnan(results["ap"]) else results["ap"]


@torch.inference_mode()
def evaluate_instances(
    model: nn.Module,
    loader: DataLoader,
    classes: Sequence[str],
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    results_json: str | Path | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
    """COCO mask AP / AP50 / AP75 / APs/m/l / AR and boundary AP of `model` on `loader`.

    Adds ``images_per_second`` (inference only) and, with ``results_json``, writes the
    predictions as a COCO results file whose image ids are the data set's ``image_id`` (and whose
    category ids are the annotation file's, for COCO data). The model runs inside `autocast`
    (e.g. ``resolve_precision("bf16", device).autocast``); its outputs come back in float32.
    """
    return InstanceTrainer.score(model, loader, {"classes": list(classes)}, device, progress, results_json, autocast)


@torch.inference_mode()
def evaluate_detections(
    model: nn.Module,
    loader: DataLoader,
    evaluator: Any,
    records_of: Callable[[list[dict[str, torch.Tensor]], list[int]], list[dict[str, Any]]],
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    results_json: str | Path | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
    """The loop of :func:`evaluate_instances` for any detection task: `evaluator` (a streaming
    COCO evaluator: update, compute) scores the detections, `records_of` (predictions, image
    ids) writes them as COCO results records for `results_json`."""
    model.eval()
    records: list[dict[str, Any]] = []
    task = progress.add_task("evaluating", total=len(loader), info="") if progress is not None else None
    inference_seconds, images_seen = 0.0, 0
    for images, targets in loader:
        raise_if_interrupted()
        tic = time.perf_counter()
        with autocast():
            predictions = [sorted_detections(p) for p in model([image.to(device) for image in images])]
        inference_seconds += time.perf_counter() - tic
        images_seen += len(images)
        evaluator.update(predictions, targets)
        if results_json is not None:
            records += records_of(predictions, [t["image_id"] for t in targets])
        if progress is not None and task is not None:
            progress.update(task, advance=1)
    if progress is not None and task is not None:
        progress.remove_task(task)
    results = evaluator.compute()
    results["images_per_second"] = images_seen / max(inference_seconds, 1e-9)
    if results_json is not None:
        category_of_label = getattr(loader.dataset, "category_of_label", None)
        if category_of_label:
            records = [{**r, "category_id": category_of_label[r["category_id"]]} for r in records]
        save_coco_results(records, results_json)
    return results


def instance_metrics_table(results: dict[str, Any], title: str = "Validation") -> Table:
    """COCO mask AP figures and boundary AP, one row, plus per-class mask AP."""
    return metrics_table(results, _TABLE_COLUMNS, title)


def metrics_table(results: dict[str, Any], columns: dict[str, str], title: str) -> Table:
    """One row of `results` under `columns` (key -> heading, the first the AP of the caption's
    per-class figures), NaN as "-"."""
    table = Table(title=title)
    for heading in columns.values():
        table.add_column(heading, justify="right")
    table.add_row(*(_fmt(results.get(k, float("nan"))) for k in columns))
    per_class = results.get("ap_per_class") or {}
    if per_class:
        table.caption = f"per class {next(iter(columns.values()))}: " + ", ".join(f"{name} {_fmt(value)}" for name, value in per_class.items())
    return table


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


# --- the command line's entry points (seglab train/eval/predict hand instance work here) ------


def train_instance(values: dict[str, Any], console: Console, resume: str | Path | None = None,
                   trainer_class: type[InstanceTrainer] = InstanceTrainer, defaults: dict[str, Any] = INSTANCE_DEFAULTS) -> int:
    """`seglab train --task instance`: the instance defaults, overridden by config file and flags;
    with `resume`, the run there continued (`values` are then the flags that may change).
    Keypoint training passes its own trainer class and defaults."""
    if resume is not None:
        trainer = trainer_class.resume(resume, values, console=console)
    else:
        # the defaults' model options (keypoint heads' widths) stay under the user's
        model_kwargs = {**defaults.get("model_kwargs", {}), **(values.get("model_kwargs") or {})}
        trainer = trainer_class(TrainConfig.from_dict({**defaults, **values, "model_kwargs": model_kwargs}, source="options"),
                                console=console)
    summary = trainer.fit()
    out = Console()
    out.print(f"Best validation {trainer.figures_words(summary)} (epoch {summary['best_epoch']}), {summary['seconds']:.0f} s")
    out.print(f"Results in {summary['run_dir']}/  (best.safetensors, metrics.jsonl, curves.png, overlays/)")
    return 0


def eval_instance(model: nn.Module, config: dict[str, Any], args: Any, console: Console,
                  trainer_class: type[InstanceTrainer] = InstanceTrainer) -> int:
    """`seglab eval` of an instance checkpoint: COCO mask AP table, optionally JSON files
    (OKS AP of a keypoint checkpoint, with `trainer_class` the keypoint trainer).

    ``args`` carries data, split, batch_size, device, json, precision, direct_convolutions and
    image_size (the synthetic set's, as `seglab eval` parses them);
    with --json, the COCO results records are written beside it as ``<name>.results.json``.
    """
    device = resolve_device(args.device)
    precision = resolve_precision(getattr(args, "precision", "32"), device)  # refused here, before any data is read
    data = dict(config.get("data", {"source": "synthetic"}))
    source = data.pop("source")
    if getattr(args, "data", None) and args.data != source:
        source, data = args.data, {}
    if getattr(args, "format", None):
        data["format"] = args.format
    if getattr(args, "image_size", None) is not None:  # a synthetic size other than the training one
        if source != "synthetic":
            raise ValueError(f"--image-size sizes the synthetic set; {source} is scored at its images' own sizes")
        data["image_size"] = args.image_size
    dataset = trainer_class.open_dataset(source, args.split, **data)
    check_data_classes(config["classes"], dataset.classes, f"the {args.split} split of {source}")
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_instances)
    results_json = Path(args.json).with_suffix(".results.json") if getattr(args, "json", None) else None
    # conv-BN folding and channels_last; in float32 also fused activations and Winograd's 3x3 convolutions
    model = optimize_instance_model(model.to(device), winograd=not getattr(args, "direct_convolutions", False),
                                    precision=precision.name)
    with progress_bar(console) as progress:
        results = trainer_class.score(model, loader, config, device, progress=progress, results_json=results_json,
                                      autocast=precision.autocast)
    Console().print(trainer_class.results_table(results, title=f"{args.split} split of {source} ({len(dataset)} images)"))
    if getattr(args, "json", None):
        atomic_write_text(Path(args.json), json.dumps({k: _json_safe(v) if not isinstance(v, dict) else v for k, v in results.items()}, indent=2))
        console.print(f"metrics written to {args.json}, COCO results to {results_json}")
    return 0
