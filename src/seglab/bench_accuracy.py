"""Does the fast path change results? A small model trained on the synthetic shapes, twice.

1. Trained in plain float32, evaluated in float32 and through the fast inference path
   (bfloat16 where available): mIoU of both and the share of pixels whose predicted class
   agrees.
2. Trained through the fast training path (channels_last, bf16 autocast, fused optimizer;
   Winograd's 3x3 convolutions where it trains in float32 on the CPU, the native norms where
   it trains in bf16 there) from
   the same seed and data order, evaluated in float32: its mIoU against run 1's.
3. Where the CPU has 8-bit products, run 1's model through the int8 inference path,
   calibrated on training images: its mIoU and agreement with float32; and a third training
   run, the float32 fast training path with int8 products for the large 1x1 convolutions
   (`seglab.ops.int8_products`), from the same seed and data order: its mIoU against run 1's.

The comparison only tells something about a model that has learned: one that still paints
every pixel background agrees with itself whatever the arithmetic. The six-class shapes take
thousands of steps (the quick start's 2,250 reach 0.88 mIoU; UNet-R34 from scratch was at 0.30
after 960), so the check asks by default for two classes, one shape kind against the
background, which UNet-R34 learns to 0.74-0.80 mIoU in the check's 144 steps (seeds 0-3, the
floor 0.35); the report carries that floor, the mIoU of predicting background everywhere.
Inference through the fast and int8 paths is compared on the same weights, so it resolves
hundredths of a point; the training runs are compared one seed each, and at this length they
spread by points either way (fast training -2.2 to +4.2 over those seeds; SegFormer-B0, still
climbing steeply, -8.7 to +9.1): they show a broken route, not a half-point difference
(`benchmarks/f2x2_training_accuracy.py` runs the recipe over seeds).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.data.synthetic import SyntheticShapes
from seglab.engine.fastpath import (
    autocast_context,
    default_precision,
    optimize_for_inference,
    optimizer_options,
    prepare_batch,
    to_channels_last,
    training_convolutions,
    training_norms,
)
from seglab.engine.int8 import cpu_runs_int8
from seglab.losses import CrossEntropyLoss
from seglab.metrics.confusion import ConfusionMatrix
from seglab.models.registry import create_model
from seglab.ops.class_map import class_indices

__all__ = ["accuracy_check", "background_only_miou", "miou_points", "predict_classes", "shapes_tensors",
           "train_on_tensors"]

_MEAN, _STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
INT8_CALIBRATION_IMAGES = 64
# Two classes, one shape kind against the background, over 6 epochs of 384 images (144 steps):
# UNet-R34 learns it to 0.74-0.80 mIoU, where six classes stay near the floor (see above).
ACCURACY_CLASSES = 2
ACCURACY_EPOCHS = 6


def shapes_tensors(dataset: SyntheticShapes) -> tuple[torch.Tensor, torch.Tensor]:
    """All of `dataset` as one normalised N x 3 x H x W batch and its N x H x W masks."""
    samples = [dataset[i] for i in range(len(dataset))]
    images = prepare_batch([s["image"] for s in samples], _MEAN, _STD, channels_last=False)
    return images, torch.stack([s["mask"] for s in samples])


def train_on_tensors(build: Callable[[], nn.Module], images: torch.Tensor, masks: torch.Tensor,
                     device: torch.device, *, fast: bool, precision: str, epochs: int, batch_size: int, seed: int,
                     int8_products: bool = False) -> nn.Module:
    """A model from `build`, trained on `images` / `masks` (AdamW at 2e-3 with a cosine decay
    over the steps, cross-entropy, seeded weights and batch order): in plain float32 eager
    code, or (`fast`) through the fast training path at `precision` as the trainer runs it.
    Returned in eval mode."""
    torch.manual_seed(seed)
    model = build().to(device).train()
    if fast:
        model = to_channels_last(model)
    options = optimizer_options("adamw", device) if fast else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, **options)
    # a decaying rate, as the trainer's default: the runs end settled, so that what differs
    # between them is the arithmetic more than where the last large steps happened to land
    steps = epochs * (len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    convolutions = training_convolutions(model, device, precision, enabled=fast, int8_products=int8_products)
    norms = training_norms(model, device, precision, enabled=fast)
    loss_fn = CrossEntropyLoss(ignore_index=None)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        permutation = torch.randperm(len(images), generator=order)
        for start in range(0, len(images) - batch_size + 1, batch_size):
            index = permutation[start : start + batch_size]
            x, y = images[index].to(device), masks[index].to(device)
            if fast:
                x = to_channels_last(x)
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, precision if fast else "32"), convolutions, norms:
                output = model(x)
            logits = output["out"] if isinstance(output, dict) else output
            # seglab's loss (on the CPU one native pass over the logits as they come) as its trainer runs it
            (loss_fn(logits, y) if fast else F.cross_entropy(logits.float(), y)).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def predict_classes(model: Callable[[torch.Tensor], Any], images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Each pixel's predicted class, N x H x W, in batches of 16 without gradients."""
    predictions = []
    with torch.no_grad():
        for start in range(0, len(images), 16):
            output = model(images[start : start + 16].to(device))
            predictions.append(class_indices(output["out"] if isinstance(output, dict) else output).cpu())
    return torch.cat(predictions)


def miou_points(predictions: torch.Tensor, masks: torch.Tensor, num_classes: int) -> float:
    """Mean IoU of `predictions` against `masks`, in points (0-100)."""
    matrix = ConfusionMatrix(num_classes, ignore_index=255)
    matrix.update(predictions, masks)
    return 100.0 * float(matrix.compute()["miou"])


def background_only_miou(masks: torch.Tensor, num_classes: int) -> float:
    """The mIoU (points) of predicting class 0, the background, at every pixel: the floor a
    trained model's mIoU is read against."""
    return miou_points(torch.zeros_like(masks), masks, num_classes)


def accuracy_check(model_key: str, device: str = "cpu", precision: str = "auto", *, epochs: int = ACCURACY_EPOCHS,
                   num_classes: int = ACCURACY_CLASSES, image_size: int = 64, train_samples: int = 384,
                   val_samples: int = 64, batch_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Train the benchmark architecture `model_key` (e.g. "unet-r34") twice on the synthetic
    shapes (`num_classes`: the background and the first num_classes - 1 shape kinds) and
    compare the fast paths with float32. mIoU figures are in points (0-100)."""
    from seglab.bench import ARCHITECTURES

    if model_key not in ARCHITECTURES:
        raise ValueError(f"unknown benchmark architecture {model_key!r}; known: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_key]
    torch_device = torch.device(device)
    precision = default_precision(torch_device) if precision == "auto" else precision
    train_images, train_masks = shapes_tensors(SyntheticShapes(train_samples, image_size, num_classes, "train", seed))
    val_images, val_masks = shapes_tensors(SyntheticShapes(val_samples, image_size, num_classes, "val", seed))

    def build() -> nn.Module:
        return create_model(arch.seglab_model, num_classes=num_classes, **arch.seglab_kwargs)

    common = dict(precision=precision, epochs=epochs, batch_size=batch_size, seed=seed)
    plain = train_on_tensors(build, train_images, train_masks, torch_device, fast=False, **common)
    fast_trained = train_on_tensors(build, train_images, train_masks, torch_device, fast=True, **common)
    reference = predict_classes(plain, val_images, torch_device)
    fast_inference = predict_classes(optimize_for_inference(plain, precision), val_images, torch_device)
    fast_trained_predictions = predict_classes(fast_trained, val_images, torch_device)
    miou_fp32 = miou_points(reference, val_masks, num_classes)
    miou_fast_inference = miou_points(fast_inference, val_masks, num_classes)
    miou_fast_training = miou_points(fast_trained_predictions, val_masks, num_classes)
    int8 = {}
    if torch_device.type == "cpu" and cpu_runs_int8():
        # calibrated on training images, as a user would (`seglab evaluate --precision int8`)
        calibration = train_images[:INT8_CALIBRATION_IMAGES].split(batch_size)
        int8_predictions = predict_classes(optimize_for_inference(plain, "int8", calibration=calibration),
                                           val_images, torch_device)
        miou_int8 = miou_points(int8_predictions, val_masks, num_classes)
        int8_trained = train_on_tensors(build, train_images, train_masks, torch_device, fast=True,
                                        int8_products=True, **{**common, "precision": "32"})
        miou_int8_training = miou_points(predict_classes(int8_trained, val_images, torch_device), val_masks,
                                         num_classes)
        int8 = {"miou_int8_inference": miou_int8, "miou_int8_inference_delta": miou_int8 - miou_fp32,
                "int8_argmax_agreement": float((int8_predictions == reference).float().mean()),
                "miou_int8_training": miou_int8_training, "miou_int8_training_delta": miou_int8_training - miou_fp32}
    return {
        "model": arch.title,
        "setup": f"{train_samples} synthetic {image_size}x{image_size} images of {num_classes} classes, {epochs} epochs, "
                 f"batch {batch_size}, {val_samples} validation images, fast precision {precision}",
        "miou_background_only": background_only_miou(val_masks, num_classes),
        "miou_fp32": miou_fp32,
        "miou_fast_inference": miou_fast_inference,
        "miou_fast_inference_delta": miou_fast_inference - miou_fp32,
        "argmax_agreement": float((fast_inference == reference).float().mean()),
        "miou_fast_training": miou_fast_training,
        "miou_fast_training_delta": miou_fast_training - miou_fp32,
        **int8,
    }
