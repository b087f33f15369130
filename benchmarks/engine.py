"""Engine benchmarks: training throughput at 1 and 2 processes, bf16 vs float32 (speed and
mIoU), and sliding-window inference throughput. Not a test: it prints a Markdown table.

    python benchmarks/engine.py                    # all three
    python benchmarks/engine.py --only sliding     # one part
    python benchmarks/engine.py --epochs 3 --train-samples 600

Training runs go through the CLI (`seglab train`) on the synthetic recipe (TrainConfig's
defaults: U-Net, 64x64 shapes), shortened by --epochs/--train-samples; images/s is the mean of
the epochs after the first (which pays for start-up).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def train(out: Path, name: str, extra: list[str], args: argparse.Namespace, env: dict[str, str]) -> dict:
    command = [sys.executable, "-m", "seglab", "train", "--out", str(out), "--name", name, "--epochs", str(args.epochs),
               "--train-samples", str(args.train_samples), *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    speeds = [row["train_images_per_second"] for row in rows[1:]] or [rows[0]["train_images_per_second"]]
    return {"images_per_second": statistics.mean(speeds), "miou": max(row["miou"] for row in rows), "wall_seconds": wall}


def bench_training(args: argparse.Namespace, out: Path) -> list[tuple[str, str, str, str]]:
    threads = str(args.threads)
    one = train(out, "p1", [], args, {**os.environ, "OMP_NUM_THREADS": threads})
    per_process = str(max(1, args.threads // 2))
    two = train(out, "p2", ["--nproc", "2"], args, {**os.environ, "OMP_NUM_THREADS": per_process})
    bf16 = train(out, "bf16", ["--precision", "bf16"], args, {**os.environ, "OMP_NUM_THREADS": threads})
    return [
        (f"train, 1 process x {threads} threads, fp32", f"{one['images_per_second']:.1f} img/s", f"{one['miou']:.4f}", f"{one['wall_seconds']:.0f}"),
        (f"train, 2 processes x {per_process} thread(s), fp32", f"{two['images_per_second']:.1f} img/s", f"{two['miou']:.4f}", f"{two['wall_seconds']:.0f}"),
        (f"train, 1 process x {threads} threads, bf16", f"{bf16['images_per_second']:.1f} img/s", f"{bf16['miou']:.4f}", f"{bf16['wall_seconds']:.0f}"),
    ]


def bench_sliding(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    from seglab.engine.predictor import Predictor
    from seglab.models import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("unet", num_classes=6, in_channels=3, base_channels=16, depth=4)
    config = {"classes": [str(i) for i in range(6)], "mean": [0.5] * 3, "std": [0.25] * 3, "kwargs": {"in_channels": 3}}
    image = torch.rand(3, args.sliding_size[1], args.sliding_size[0])
    rows = []
    for precision in ("32", "bf16"):
        predictor = Predictor(model, config, device="cpu", tile=512, overlap=0.25, tile_batch=4, precision=precision, optimize=True)
        predictor.predict(image[:, :512, :512])  # warm-up
        start = time.perf_counter()
        predictor.predict(image)
        seconds = time.perf_counter() - start
        megapixels = image.shape[1] * image.shape[2] / 1e6
        rows.append((f"sliding window {image.shape[2]}x{image.shape[1]}, tile 512, overlap 0.25, {precision}",
                     f"{megapixels / seconds:.2f} MP/s", "", f"{seconds:.1f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["training", "sliding"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=600)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sliding-size", type=int, nargs=2, default=[4000, 3000], metavar=("WIDTH", "HEIGHT"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        if args.only in (None, "training"):
            rows += bench_training(args, Path(folder))
        if args.only in (None, "sliding"):
            rows += bench_sliding(args)
    print("| setting | throughput | best val mIoU | wall s |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
