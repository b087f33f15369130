"""Winograd's F(2x2, 3x3), F(4x4, 3x3) and F(6x6, 3x3) (`seglab.ops.winograd`) against the
direct float32 convolution (oneDNN through F.conv2d), one convolution at a time, channels last:
the figures behind the thresholds of `seglab.engine.winograd`. Not a test: it prints a Markdown
table. In inference F(4x4) runs as `winograd_conv3x3` runs it, in one native pass for few
channels (`seglab.ops.winograd.fuses`); the column "separate passes" times it without that.

    python benchmarks/winograd.py                  # inference and training shapes
    python benchmarks/winograd.py --rounds 15 --threads 2

Each row times the three in interleaved rounds (one call of each per round) and reports the
median over rounds of direct time / Winograd time, so that a change of machine load hits all.
In training, "direct" is the convolution as the training route runs those Winograd does not
take: oneDNN's forward and input gradient, the weight gradient by the kernel timed fastest
(`seglab.ops.weight_gradient`); "eager backward" is eager PyTorch's (oneDNN's throughout).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from seglab.engine.winograd import call_output_tile, tiles, winograd_dilation
from seglab.memory import keep_freed_memory
from seglab.ops.weight_gradient import ConvSettings, tuned_convolution
import seglab.ops.winograd as ops_winograd
from seglab.ops.winograd import OUTPUT_TILES, TILE, fuses, winograd_conv3x3, winograd_filters

# (batch, C_in, C_out, map size, dilation): a ResNet's stages at a 512 input (strides 4-32), at
# output stride 8 (dilations 2 and 4), small maps where the rule says no, a decoder's fusion, and
# a Mask R-CNN mask head's RoIs (14 x 14, which fill 77% of their tiles, against 28 x 28).
INFERENCE = [(1, 16, 16, 512, 1), (1, 32, 32, 256, 1), (1, 64, 32, 256, 1), (1, 128, 64, 128, 1),
             (1, 64, 64, 128, 1), (8, 64, 64, 128, 1), (1, 128, 128, 64, 1), (8, 128, 128, 64, 1), (1, 128, 128, 16, 1),
             (1, 256, 256, 32, 1), (8, 256, 256, 32, 1), (1, 256, 256, 16, 1), (1, 512, 512, 16, 1),
             (8, 512, 512, 16, 1), (1, 512, 512, 8, 1), (1, 512, 512, 4, 1), (1, 256, 256, 64, 2),
             (1, 512, 512, 64, 4), (1, 1024, 512, 64, 1),
             (200, 128, 128, 14, 1), (50, 128, 128, 28, 1), (200, 256, 256, 14, 1)]
TRAINING = [(4, 64, 64, 128, 1), (4, 128, 128, 64, 1), (4, 128, 128, 32, 1), (4, 256, 256, 32, 1),
            (4, 256, 256, 16, 1), (4, 512, 512, 16, 1), (4, 512, 512, 8, 1), (4, 256, 256, 64, 2),
            (128, 64, 64, 14, 1), (128, 128, 128, 14, 1), (32, 128, 128, 28, 1), (128, 256, 256, 14, 1)]


def interleaved(calls: list[Callable[[], object]], rounds: int) -> tuple[list[float], list[float]]:
    """Median seconds of each call and the median per-round ratio of the first call's time to
    each one's."""
    for call in calls:
        call()
    seconds: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for times, call in zip(seconds, calls):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    ratios = [statistics.median(a / b for a, b in zip(seconds[0], times)) for times in seconds]
    return [statistics.median(times) for times in seconds], ratios


def interleaved_ms(first: Callable[[], object], second: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median milliseconds of two calls timed in interleaved rounds (`interleaved`)."""
    seconds, _ = interleaved([first, second], rounds)
    return 1e3 * seconds[0], 1e3 * seconds[1]


def interleaved_arguments(description: str, rounds: int = 9, timed: str = "forward + backward") -> argparse.Namespace:
    """`--rounds` and `--threads` as the interleaved tables take them, applied (with seglab's
    commands' memory setting), and the table's first line printed (what is `timed`)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, median of {args.rounds} rounds, {timed}, ms\n")
    return args


def row(shape: tuple[int, ...], training: bool, rounds: int) -> str:
    batch, in_channels, out_channels, size, dilation = shape
    x = torch.randn(batch, in_channels, size, size).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(out_channels, in_channels, 3, 3) / math.sqrt(9 * in_channels)).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(out_channels)
    eager = passes = "-"
    if training:
        x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
        upstream = torch.randn(batch, out_channels, size, size).contiguous(memory_format=torch.channels_last)
        settings = ConvSettings((1, 1), (dilation, dilation), (dilation, dilation))

        def direct() -> None:  # as the training route runs a convolution Winograd does not take
            tuned_convolution(x, weight, bias, settings).backward(upstream)

        def eager_direct() -> None:
            F.conv2d(x, weight, bias, padding=dilation, dilation=dilation).backward(upstream)

        def winograd(tile: int) -> Callable[[], None]:
            return lambda: winograd_conv3x3(x, winograd_filters(weight, tile), bias, dilation).backward(upstream)

        (seconds, eager_seconds, *_), (_, _, *speedups) = interleaved(
            [direct, eager_direct] + [winograd(tile) for tile in OUTPUT_TILES], rounds)
        eager = f"{eager_seconds * 1e3:.1f}"
    else:
        def winograd(tile: int) -> Callable[[], torch.Tensor]:
            filters = winograd_filters(weight, tile)

            def call() -> torch.Tensor:
                with torch.inference_mode():
                    return winograd_conv3x3(x, filters, bias, dilation)
            return call

        def direct() -> torch.Tensor:
            with torch.inference_mode():
                return F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)

        def separate_passes() -> torch.Tensor:
            with torch.inference_mode(), _without_one_pass():
                return winograd_conv3x3(x, filters_4x4, bias, dilation)

        filters_4x4 = winograd_filters(weight, TILE)
        (seconds, *_), (_, *speedups) = interleaved(
            [direct] + [winograd(tile) for tile in OUTPUT_TILES] + [separate_passes], rounds)
        passes = f"{speedups.pop():.2f}x"
    takes = winograd_dilation(weight.shape, 1, dilation, dilation, 1) is not None
    tile = call_output_tile(x, weight, dilation, training) if takes else None
    rule = "direct" if tile is None else f"F({tile}x{tile})"
    if tile == TILE and not training and fuses(in_channels, out_channels, dilation):
        rule += ", one pass"
    mode = "train" if training else "infer"
    return (f"| {mode} | {batch} | {in_channels} -> {out_channels} | {size} x {size} | {dilation} | "
            f"{tiles(x.shape, dilation)} | {seconds * 1e3:.1f} | {eager} | "
            + " | ".join(f"{speedup:.2f}x" for speedup in speedups) + f" | {passes} | {rule} |")


@contextlib.contextmanager
def _without_one_pass() -> Iterator[None]:
    """F(4x4) by the separate passes (native gather, batched products, native scatter) however
    few the channels."""
    limit = ops_winograd.MAX_FUSED_CHANNEL_PRODUCT
    ops_winograd.MAX_FUSED_CHANNEL_PRODUCT = 0
    try:
        yield
    finally:
        ops_winograd.MAX_FUSED_CHANNEL_PRODUCT = limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keep_freed_memory()  # as seglab's commands run
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.rounds} interleaved rounds\n")
    print("| mode | batch | channels | map | dilation | 4 x 4 tiles | direct (ms) | eager backward (ms) | "
          + " | ".join(f"direct / F({tile}x{tile})" for tile in OUTPUT_TILES)
          + " | direct / F(4x4), separate passes | rule picks |")
    print("|---" * (10 + len(OUTPUT_TILES)) + "|")
    for shape in INFERENCE:
        print(row(shape, False, args.rounds), flush=True)
    for shape in TRAINING:
        print(row(shape, True, args.rounds), flush=True)


if __name__ == "__main__":
    main()
