"""Metric throughput, side by side with the peers, in one run.

1. Confusion-matrix updates per second on 8 x 512 x 512 class-index maps with 21 classes:
   seglab.metrics.ConfusionMatrix versus torchmetrics.segmentation.MeanIoU (index input).
2. Boundary IoU (Cheng et al. 2021, dilation ratio 0.02) of 1,000 mask pairs: seglab's batched
   torch version versus a per-mask OpenCV implementation of the same definition (pad, erode d
   times with a 3x3 kernel, mask minus erosion), results checked equal.

    python benchmarks/metrics.py [--threads 1] [--repeats 5] [--sizes 128 256] [--json out.json]

Timings are medians over repeats after a warm-up, wall clock, on whatever else the machine runs.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torchmetrics.segmentation import MeanIoU

from seglab.metrics import ConfusionMatrix, boundary_iou


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def confusion_updates(repeats: int, updates: int = 5) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 21, (8, 512, 512), generator=g)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.7, target, torch.randint(0, 21, target.shape, generator=g))
    ours, theirs = ConfusionMatrix(21), MeanIoU(num_classes=21, input_format="index", per_class=True)

    def run_ours():
        for _ in range(updates):
            ours.update(pred, target)

    def run_theirs():
        for _ in range(updates):
            theirs.update(pred, target)

    seglab_rate = updates / median_seconds(run_ours, repeats)
    torchmetrics_rate = updates / median_seconds(run_theirs, repeats)
    return {"seglab_updates_per_s": seglab_rate, "torchmetrics_updates_per_s": torchmetrics_rate,
            "speedup": seglab_rate / torchmetrics_rate}


def opencv_boundary(mask: np.ndarray, dilation_ratio: float) -> np.ndarray:
    h, w = mask.shape
    d = max(1, round(dilation_ratio * math.sqrt(h * h + w * w)))
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
    return mask - eroded


def opencv_boundary_iou(pred: np.ndarray, target: np.ndarray, dilation_ratio: float = 0.02) -> float:
    pred_band, target_band = opencv_boundary(pred, dilation_ratio), opencv_boundary(target, dilation_ratio)
    union = ((pred_band + target_band) > 0).sum()
    return float(((pred_band * target_band) > 0).sum() / union) if union else float("nan")


def blob_masks(count: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random blobs (thresholded upsampled noise), the shapes of real instance masks."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, 1, max(2, size // 16), max(2, size // 16), generator=g)
    return F.interpolate(noise, size=(size, size), mode="bilinear")[:, 0] > 0.6


def boundary_pairs(size: int, repeats: int, count: int = 1000) -> dict[str, float]:
    target = blob_masks(count, size, seed=size)
    pred = torch.roll(target, shifts=(1, 2), dims=(1, 2)) ^ (blob_masks(count, size, seed=size + 1) & blob_masks(count, size, seed=size + 2))
    pred_np, target_np = pred.numpy().astype(np.uint8), target.numpy().astype(np.uint8)
    ours = boundary_iou(pred, target)
    reference = np.array([opencv_boundary_iou(p, t) for p, t in zip(pred_np, target_np)])
    max_difference = float(np.nanmax(np.abs(ours.numpy() - reference)))
    if not np.array_equal(np.isnan(ours.numpy()), np.isnan(reference)) or max_difference > 1e-12:
        raise RuntimeError(f"seglab and the OpenCV reference disagree at {size}x{size} (max difference {max_difference})")
    seglab_s = median_seconds(lambda: boundary_iou(pred, target), repeats)
    opencv_s = median_seconds(lambda: [opencv_boundary_iou(p, t) for p, t in zip(pred_np, target_np)], repeats)
    return {"size": size, "masks": count, "seglab_s": seglab_s, "opencv_loop_s": opencv_s,
            "speedup": opencv_s / seglab_s, "max_abs_difference": max_difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch and OpenCV threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="mask sizes for Boundary IoU")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    results = {
        "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "opencv_threads": cv2.getNumThreads(), "torch": torch.__version__, "opencv": cv2.__version__},
        "confusion_matrix_8x512x512_k21": confusion_updates(args.repeats),
        "boundary_iou_1000_masks": [boundary_pairs(size, args.repeats) for size in args.sizes],
    }
    table = Table(title=f"seglab metrics benchmark ({torch.get_num_threads()} torch threads, {cv2.getNumThreads()} OpenCV threads)")
    for column in ("benchmark", "seglab", "peer", "speed-up"):
        table.add_column(column, justify="left" if column == "benchmark" else "right")
    cm = results["confusion_matrix_8x512x512_k21"]
    table.add_row("confusion matrix 8x512x512, 21 cl. (updates/s) vs torchmetrics MeanIoU",
                  f"{cm['seglab_updates_per_s']:.1f}", f"{cm['torchmetrics_updates_per_s']:.1f}", f"{cm['speedup']:.1f}x")
    for row in results["boundary_iou_1000_masks"]:
        table.add_row(f"Boundary IoU, 1000 pairs {row['size']}x{row['size']} (s) vs OpenCV per-mask loop",
                      f"{row['seglab_s']:.3f}", f"{row['opencv_loop_s']:.3f}", f"{row['speedup']:.1f}x")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
