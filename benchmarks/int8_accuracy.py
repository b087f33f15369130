"""Does int8 inference keep a trained network's mIoU? Not a test: it prints a Markdown table.

    python benchmarks/int8_accuracy.py
    python benchmarks/int8_accuracy.py --models unet-r34,deeplabv3-r50 --train-samples 1536 --epochs 6
    python benchmarks/int8_accuracy.py --classes 2

Each of the bench's architectures is trained once on the synthetic shapes through the float32
fast training path (`seglab.bench_accuracy`'s loop: AdamW 2e-3 decaying by a cosine, batch 16,
seeded), then its validation images are predicted three ways: the model as trained (float32),
the float32 fast inference path, and int8 inference (`optimize_for_inference(model, "int8")`,
calibrated on the first `--calibration-images` training images: by default 16, as `seglab eval
--precision int8` and the int8 record `seglab train` stores do). mIoU in points, and the share
of pixels whose class agrees with float32's. The heading gives the mIoU of painting everything
background: on all six classes, 576 steps leave the networks 6-27 points above it (docs/bench.md);
`--classes 2` (one shape kind against the background, as `seglab bench --accuracy` trains by
default) gives models far above it in fewer steps.
"""
from __future__ import annotations

import argparse
import time

import torch

from seglab.bench import ARCHITECTURES
from seglab.bench_accuracy import background_only_miou, miou_points, predict_classes, shapes_tensors, train_on_tensors
from seglab.data.synthetic import SyntheticShapes
from seglab.engine.fastpath import optimize_for_inference
from seglab.engine.int8 import require_int8
from seglab.engine.int8_checkpoint import CALIBRATION_IMAGES
from seglab.memory import keep_freed_memory
from seglab.models.registry import create_model

MODELS = "unet-r34,fpn-r34,deeplabv3plus-r34,pspnet-r34-os8,segformer-b0,deeplabv3-r50"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--train-samples", type=int, default=1536)
    parser.add_argument("--val-samples", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=6,
                        help="the background and the first classes - 1 shape kinds (2-6; default 6)")
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES)
    args = parser.parse_args()
    device = torch.device("cpu")
    try:
        require_int8(device, "benchmarks/int8_accuracy.py", "run it on a CPU with VNNI or AMX")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    keep_freed_memory()
    try:
        train_set = SyntheticShapes(args.train_samples, args.size, args.classes, "train", args.seed)
    except ValueError as error:
        raise SystemExit(f"benchmarks/int8_accuracy.py: {error}") from None
    train_images, train_masks = shapes_tensors(train_set)
    val_images, val_masks = shapes_tensors(SyntheticShapes(args.val_samples, args.size, args.classes, "val", args.seed))
    calibration = train_images[:args.calibration_images].split(16)
    print(f"{args.train_samples} synthetic {args.size} x {args.size} images of {args.classes} classes, {args.epochs} "
          f"epochs, seed {args.seed}; {args.val_samples} validation images (mIoU of background everywhere: "
          f"{background_only_miou(val_masks, args.classes):.2f}); int8 calibrated on {args.calibration_images} "
          "training images\n")
    print("| network | mIoU float32 | float32 fast path | int8 | int8 - float32 | pixels agreeing: fast path / int8 "
          "| training |")
    print("|---|---|---|---|---|---|---|")
    for key in args.models.split(","):
        arch = ARCHITECTURES[key]

        def build() -> torch.nn.Module:
            return create_model(arch.seglab_model, num_classes=args.classes, **arch.seglab_kwargs)

        start = time.perf_counter()
        model = train_on_tensors(build, train_images, train_masks, device, fast=True, precision="32",
                                 epochs=args.epochs, batch_size=16, seed=args.seed)
        seconds = time.perf_counter() - start
        reference = predict_classes(model, val_images, device)
        fast = predict_classes(optimize_for_inference(model, "32"), val_images, device)
        int8 = predict_classes(optimize_for_inference(model, "int8", calibration=calibration), val_images, device)
        miou = [miou_points(predictions, val_masks, args.classes) for predictions in (reference, fast, int8)]
        agreement = [float((predictions == reference).float().mean()) for predictions in (fast, int8)]
        print(f"| {arch.title} | {miou[0]:.2f} | {miou[1]:.2f} | {miou[2]:.2f} | {miou[2] - miou[0]:+.3f} points "
              f"| {agreement[0]:.2%} / {agreement[1]:.2%} | {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
