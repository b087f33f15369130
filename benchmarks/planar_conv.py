"""3x3 heads to few classes with vectors along the pixels (`seglab.ops.planar_conv`,
`seglab.engine.fastpath.use_planar_heads`) against oneDNN's direct convolution as the fast path
otherwise runs it (packed weights, channels last): the figures behind the step. Not a test: it
prints a Markdown table.

    python benchmarks/planar_conv.py              # batch 1 and 8
    python benchmarks/planar_conv.py --rounds 15 --threads 2

Rows: U-Net's head (16 -> 21 on 512 x 512), a head on a stride-4 map (128 -> 21 on 128 x 128),
and a 16 -> 16 convolution for contrast (whole vectors: oneDNN's kernel fills them). Each row
times both in interleaved rounds and reports GFLOP/s and the median over rounds of oneDNN's
time / the planar kernel's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.engine.onednn import FusedConv
from seglab.ops import native
from seglab.ops.planar_conv import arranged_weights, planar_conv3x3
from winograd import interleaved, interleaved_arguments

SHAPES = ((16, 21, 512), (128, 21, 128), (16, 16, 512))  # in, out, side


def row(batch: int, in_channels: int, out_channels: int, side: int, rounds: int) -> str:
    torch.manual_seed(0)
    conv = FusedConv(nn.Conv2d(in_channels, out_channels, 3, padding=1).eval(), prepack=True)
    x = torch.randn(batch, in_channels, side, side).contiguous(memory_format=torch.channels_last)
    taps, biases = arranged_weights(conv.weight, conv.bias)

    def onednn() -> None:
        with torch.inference_mode():
            conv(x)

    def planar() -> None:
        with torch.inference_mode():
            planar_conv3x3(x, taps, biases, out_channels)

    seconds, ratios = interleaved([onednn, planar], rounds)
    gflop = 2 * batch * in_channels * out_channels * 9 * side * side / 1e9
    return (f"| {batch} | {in_channels} -> {out_channels} on {side} x {side} | {seconds[0] * 1e3:.2f} "
            f"({gflop / seconds[0]:.0f}) | {seconds[1] * 1e3:.2f} ({gflop / seconds[1]:.0f}) | {ratios[1]:.2f}x |")


def main() -> None:
    args = interleaved_arguments(__doc__.split("\n\n")[0], rounds=9, timed="inference")
    if not native.available():
        raise SystemExit(f"the native kernels are not available: {native.unavailable_reason()}")
    print("| batch | convolution | oneDNN, ms (GFLOP/s) | planar, ms (GFLOP/s) | oneDNN / planar |")
    print("|---|---|---|---|---|")
    for batch in (1, 8):
        for in_channels, out_channels, side in SHAPES:
            print(row(batch, in_channels, out_channels, side, args.rounds), flush=True)


if __name__ == "__main__":
    main()
