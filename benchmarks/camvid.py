"""CamVid recipes: seglab side by side with segmentation_models_pytorch, and the data loader's speed.

    python benchmarks/camvid.py loader                       # loader images/s, 0 and 2 workers
    python benchmarks/camvid.py train --minutes 4            # every recipe, seglab and smp

``train`` reads each recipe in configs/ (data, image size, augmentation, class weights,
optimizer, lr, batch size, seed) and trains the recipe's architecture twice with one loop: the
seglab model and the same architecture from segmentation_models_pytorch (random init, no
download). Both get the same data order, initial seed and wall-clock budget; the learning rate
follows a cosine over the budget (so a run that is stopped by time has finished its schedule).
SegNet has no segmentation_models_pytorch counterpart, so it runs for seglab only. Each run is
then evaluated on the whole validation split at the recipe's size: mIoU, class-average
accuracy (mean recall) and global (pixel) accuracy, as the SegNet paper reports them.

The loop also splits each step into time spent waiting for data and time spent in the model,
which is the evidence for (or against) training being compute-bound. Results go to
benchmarks/results/camvid.json (merged with what is there).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from seglab import create_model
from seglab.data import open_dataset
from seglab.data.stats import median_frequency_weights
from seglab.engine.checkpoint import save_checkpoint
from seglab.engine.evaluator import Normalize
from seglab.engine.fastpath import autocast_context, default_precision, optimizer_options, to_channels_last
from seglab.metrics import ConfusionMatrix

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("segnet", "unet", "deeplabv3plus")
RESULTS = ROOT / "benchmarks" / "results" / "camvid.json"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_recipe(name: str) -> dict[str, Any]:
    recipe = yaml.safe_load((ROOT / "configs" / f"camvid_{name}.yaml").read_text())
    recipe["data"] = str((ROOT / recipe["data"]).resolve())
    return recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(recipe: dict[str, Any], library: str, num_classes: int) -> nn.Module:
    if library == "seglab":
        kwargs = dict(recipe.get("model_kwargs") or {})
        if recipe.get("encoder"):
            kwargs["encoder"] = recipe["encoder"]
        return create_model(recipe["model"], num_classes=num_classes, in_channels=3, **kwargs)
    import segmentation_models_pytorch as smp

    if recipe["model"] == "unet":
        return smp.Unet(recipe["encoder"], encoder_weights=None, classes=num_classes)
    if recipe["model"] == "deeplabv3plus":
        stride = (recipe.get("model_kwargs") or {}).get("output_stride", 16)
        return smp.DeepLabV3Plus(recipe["encoder"], encoder_weights=None, encoder_output_stride=stride, classes=num_classes)
    raise ValueError(f"segmentation_models_pytorch has no {recipe['model']}")


def logits_of(output: Any) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output


def train_and_evaluate(recipe: dict[str, Any], library: str, minutes: float, val_images: int | None = None,
                       checkpoint: Path | None = None) -> dict[str, Any]:
    seed_everything(recipe["seed"])
    size, fmt = recipe["image_size"], recipe.get("format")
    train_set = open_dataset(recipe["data"], "train", format=fmt, image_size=size, augment=recipe.get("augment"))
    val_set = open_dataset(recipe["data"], "val", format=fmt, image_size=size)
    if val_images is not None:  # smoke runs only; reported figures use the whole split
        val_set.pairs = val_set.pairs[:val_images]
    weights = None
    if recipe.get("class_weights") == "median_frequency":
        weights = torch.tensor(median_frequency_weights(train_set), dtype=torch.float32)
    elif recipe.get("class_weights"):
        weights = torch.tensor(recipe["class_weights"], dtype=torch.float32)
    seed_everything(recipe["seed"])
    model = build_model(recipe, library, train_set.num_classes)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    # Each library as its users run it: seglab with its default fast path (precision "auto":
    # bf16 autocast + channels_last where the CPU has native bf16, fused AdamW), the peer in fp32
    # as its README shows. Both are evaluated in fp32.
    precision = default_precision("cpu") if library == "seglab" else "32"
    fused = optimizer_options("adamw", "cpu") if library == "seglab" else {}
    if precision != "32":
        model = to_channels_last(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"], **fused)
    loader = DataLoader(
        train_set, batch_size=recipe["batch_size"], shuffle=True, drop_last=True, num_workers=recipe.get("workers", 0),
        generator=torch.Generator().manual_seed(recipe["seed"]), persistent_workers=recipe.get("workers", 0) > 0,
    )
    budget = 60 * minutes
    start = time.perf_counter()
    steps = images = 0
    data_seconds = compute_seconds = 0.0
    model.train()
    while time.perf_counter() - start < budget:
        fetch = time.perf_counter()
        for batch in loader:
            begin = time.perf_counter()
            data_seconds += begin - fetch
            elapsed = begin - start
            if elapsed >= budget:
                break
            for group in optimizer.param_groups:  # cosine over the time budget
                group["lr"] = recipe["lr"] * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
            images_in = normalize(batch["image"])
            with autocast_context("cpu", precision):
                logits = logits_of(model(to_channels_last(images_in) if precision != "32" else images_in))
            loss = F.cross_entropy(logits.float(), batch["mask"], weight=weights, ignore_index=255)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            images += batch["image"].shape[0]
            fetch = time.perf_counter()
            compute_seconds += fetch - begin
    train_seconds = time.perf_counter() - start
    model = model.to(memory_format=torch.contiguous_format)
    metrics = evaluate(model, val_set, normalize)
    if checkpoint is not None and library == "seglab":  # for benchmarks/crf_camvid.py
        save_checkpoint(checkpoint, model, {
            "task": "semantic", "model": recipe["model"],
            "kwargs": {"num_classes": train_set.num_classes, "in_channels": 3, **({"encoder": recipe["encoder"]} if recipe.get("encoder") else {}),
                       **(recipe.get("model_kwargs") or {})},
            "classes": list(train_set.classes), "palette": [list(c) for c in train_set.palette],
            "ignore_index": train_set.ignore_index, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "image_size": list(size), "data": {"image_size": list(size)}, "metrics": {k: v for k, v in metrics.items() if k != "val_iou"},
        })
    return {
        "recipe": recipe["model"],
        "library": library,
        "precision": precision,
        "encoder": recipe.get("encoder"),
        "image_size": size,
        "budget_minutes": minutes,
        "val_images": len(val_set),
        "train_seconds": round(train_seconds, 1),
        "steps": steps,
        "images_seen": images,
        "epochs_seen": round(images / len(train_set), 2),
        "train_images_per_second": round(images / compute_seconds, 2) if compute_seconds else None,
        "data_wait_share": round(data_seconds / (data_seconds + compute_seconds), 4) if steps else None,
        "final_loss": round(loss.item(), 4) if steps else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        **metrics,
    }


@torch.inference_mode()
def evaluate(model: nn.Module, dataset, normalize: nn.Module) -> dict[str, Any]:
    model.eval()
    matrix = ConfusionMatrix(dataset.num_classes, ignore_index=dataset.ignore_index)
    start = time.perf_counter()
    for batch in DataLoader(dataset, batch_size=8):
        matrix.update(logits_of(model(normalize(batch["image"]))).argmax(1), batch["mask"])
    result = matrix.compute()
    return {
        "val_miou": round(result["miou"], 4),
        "val_class_average_accuracy": round(result["mean_accuracy"], 4),
        "val_global_accuracy": round(result["pixel_accuracy"], 4),
        "val_iou": dict(zip(dataset.classes, [round(float(v), 4) for v in result["iou"]])),
        "eval_seconds": round(time.perf_counter() - start, 1),
    }


def loader_speed(recipe: dict[str, Any], workers: int, batches: int) -> dict[str, Any]:
    """Images/s of the training loader alone (decode, augment, collate), after one warm-up batch."""
    seed_everything(0)
    dataset = open_dataset(recipe["data"], "train", format=recipe.get("format"), image_size=recipe["image_size"], augment=recipe.get("augment"))
    loader = DataLoader(dataset, batch_size=recipe["batch_size"], shuffle=True, num_workers=workers)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        count += next(iterator)["image"].shape[0]
    seconds = time.perf_counter() - start
    return {"workers": workers, "images": count, "seconds": round(seconds, 2), "images_per_second": round(count / seconds, 1)}


def save(key: str, value: Any, path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = value
    results["conditions"] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg_at_save": os.getloadavg(),
        "saved": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    path.write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    loader = commands.add_parser("loader", help="training loader images/s with 0 and 2 workers")
    loader.add_argument("--batches", type=int, default=15)
    train = commands.add_parser("train", help="train every recipe with seglab and smp under one budget")
    train.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    train.add_argument("--libraries", nargs="+", default=["seglab", "smp"], choices=["seglab", "smp"])
    train.add_argument("--minutes", type=float, default=4.0, help="training budget per run (default 4)")
    train.add_argument("--val-images", type=int, help="evaluate on the first N val images only (smoke runs)")
    train.add_argument("--checkpoints", type=Path, default=ROOT / "runs" / "camvid-bench",
                       help="where the seglab models are saved, e.g. for benchmarks/crf_camvid.py (default runs/camvid-bench)")
    train.add_argument("--results", type=Path, default=RESULTS, help=f"JSON file to merge the runs into (default {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args(argv)

    if args.command == "loader":
        recipe = load_recipe("unet")
        rows = [loader_speed(recipe, workers, args.batches) for workers in (0, 2)]
        for row in rows:
            print(f"loader, {row['workers']} workers: {row['images_per_second']} images/s ({row['images']} images in {row['seconds']} s)")
        save("loader", {"image_size": recipe["image_size"], "batch_size": recipe["batch_size"], "augment": recipe["augment"], "rows": rows})
        return 0
    runs = json.loads(args.results.read_text()).get("runs", {}) if args.results.is_file() else {}
    for name in args.recipes:
        recipe = load_recipe(name)
        for library in args.libraries:
            if library == "smp" and name == "segnet":
                continue
            print(f"training {name} with {library} for {args.minutes} min ...", flush=True)
            row = train_and_evaluate(recipe, library, args.minutes, args.val_images, args.checkpoints / name)
            print(json.dumps({k: v for k, v in row.items() if k != "val_iou"}), flush=True)
            runs[f"{name}/{library}"] = row
            save("runs", runs, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
