"""How far does each rounding of a training step move its gradient? Not a test: it prints a
Markdown table.

    python benchmarks/training_gradient_error.py
    python benchmarks/training_gradient_error.py --checkpoint runs/deeplabv3-synthetic

One batch of the synthetic recipe's images (64 x 64 shapes, batch 16, 6 classes), one forward
and backward of DeepLabV3-R50 at output stride 8 in training mode (BatchNorm on batch
statistics; dropout off, so that every route sees the same function), and the gradient of
every parameter compared with float64's: in float32 eager (oneDNN), through the float32
training route (`training_convolutions`, its fixed kernels), the same route with int8
products for the large 1x1 convolutions and the ASPP's windows (`seglab.ops.int8_products`,
the default of `seglab train --precision auto` on CPUs with VNNI or AMX but no native bf16;
the ASPP's dilated taps reach inside its map only with `--size` 128 and up), and under bf16 autocast
(the default where bf16 is native). A noisy mIoU over a few seeds cannot size a rounding's
effect smaller than its seed-to-seed spread; the gradient it hands the optimiser can be.

Errors are relative L2 norms against float64: over all parameters at once, and the median
and 90th percentile over the parameter tensors. The model at random initialisation, and with
`--checkpoint` a trained one (`seglab train`'s run directory or weights file; its model and
classes must match: DeepLabV3-R50, output stride 8, 6 classes, as the recipe trains it).
bf16 on a CPU without native bf16 runs by conversion: slow, the same values.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import warnings
from typing import Any, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.data.synthetic import SyntheticShapes
from seglab.engine.checkpoint import load_checkpoint
from seglab.engine.fastpath import autocast_context, prepare_batch, to_channels_last, training_convolutions
from seglab.models import create_model

# route: None for eager NCHW, else `training_convolutions`' options on channels-last maps
# (enabled=False: channels-last eager convolutions); precision: the autocast precision
ROUTES: dict[str, dict[str, Any]] = {
    "float32 eager (oneDNN)": dict(route=None, precision="32"),
    "float32 training route": dict(route=dict(deterministic=True), precision="32"),
    "float32 route + int8 products": dict(route=dict(deterministic=True, int8_products=True), precision="32"),
    "bf16 autocast": dict(route=dict(enabled=False), precision="bf16"),
}


def recipe_batch(batch: int, seed: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic recipe's training images (normalised as `seglab train` does) and masks."""
    shapes = SyntheticShapes(batch, size, 6, "train", seed)
    samples = [shapes[i] for i in range(batch)]
    images = prepare_batch([s["image"] for s in samples], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                           channels_last=False)
    return images, torch.stack([s["mask"] for s in samples])


def without_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return model.train()


def gradients(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, *, route: dict[str, Any] | None,
              precision: str, dtype: torch.dtype = torch.float32) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward of a copy of `model`: the loss and every parameter's gradient (float64)."""
    model = copy.deepcopy(model).to(dtype)
    inputs = images.to(dtype)
    context: ContextManager = contextlib.nullcontext()
    if route is not None:
        model, inputs = to_channels_last(model), to_channels_last(inputs)
        context = training_convolutions(model, "cpu", "32" if precision == "32" else precision, **route)
    with autocast_context("cpu", precision), context:
        output = model(inputs)
    logits = output["out"] if isinstance(output, dict) else output
    loss = F.cross_entropy(logits.to(torch.float64 if dtype == torch.float64 else torch.float32), masks)
    loss.backward()
    return float(loss), {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}


def relative_errors(found: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """(over all parameters, median tensor, 90th percentile tensor) of |found - reference| / |reference|."""
    difference = sum(float((found[n] - reference[n]).square().sum()) for n in reference)
    size = sum(float(reference[n].square().sum()) for n in reference)
    per_tensor = sorted(float((found[n] - reference[n]).norm() / reference[n].norm())
                        for n in reference if reference[n].norm() > 0)
    return (difference / size) ** 0.5, statistics.median(per_tensor), per_tensor[int(0.9 * (len(per_tensor) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="also a trained DeepLabV3-R50 (a seglab run directory or weights file)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=3, help="which synthetic images")
    parser.add_argument("--size", type=int, default=64,
                        help="the images' side (the recipe's 64 leaves the ASPP an 8 x 8 map, where its dilated "
                             "taps reach outside but for the centre; 512 gives the 64 x 64 of the benchmarks)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # bf16 by conversion warns that it is slow
    images, masks = recipe_batch(args.batch, args.seed, args.size)
    torch.manual_seed(0)
    models = {"random initialisation": create_model("deeplabv3", encoder="resnet50", output_stride=8, num_classes=6)}
    if args.checkpoint:
        models[f"trained ({args.checkpoint})"] = load_checkpoint(args.checkpoint)[0]
    print("| model | route | loss (float64's) | gradient error: all | median tensor | 90th percentile |")
    print("|---|---|---|---|---|---|")
    for title, model in models.items():
        model = without_dropout(model)
        reference_loss, reference = gradients(model, images, masks, route=None, precision="32", dtype=torch.float64)
        for name, options in ROUTES.items():
            loss, found = gradients(model, images, masks, **options)
            overall, median, high = relative_errors(found, reference)
            print(f"| {title} | {name} | {loss:.6f} ({reference_loss:.6f}) | {overall:.2e} | {median:.2e} | {high:.2e} |")


if __name__ == "__main__":
    main()
