"""The transposed convolution of kernel 2s and stride s (FCN's upsampling) by oneDNN's own
kernel against the phase convolution of `seglab.ops.polyphase`, one layer at a time, channels
last: the figures behind `MIN_STRIDE`. Not a test: it prints a Markdown table.

    python benchmarks/polyphase.py                   # FCN's layers at a 512 x 512 input
    python benchmarks/polyphase.py --rounds 9 --batch 1

Each row times forward and forward + backward (gradients of the input and the weight) of both,
in interleaved rounds so that a change of machine load hits both (`benchmarks/winograd.py`'s
`interleaved`), and prints the medians.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from winograd import interleaved  # benchmarks/winograd.py: one warm-up call, then rounds of one call each

from seglab.memory import keep_freed_memory
from seglab.ops.polyphase import polyphase_conv_transpose2d

# (stride, input map size, channels): FCN-8s's, -16s's and -32s's final upsampling of 21 class
# scores to 512 x 512, the x2 steps between them, and a wider map of scores.
LAYERS = [(8, 64, 21), (16, 32, 21), (32, 16, 21), (2, 16, 21), (2, 32, 21), (4, 32, 21), (8, 64, 64)]


def measure(stride: int, size: int, channels: int, batch: int, dtype: torch.dtype, rounds: int) -> dict[str, float]:
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(channels, channels, 2 * stride, 2 * stride) * 0.01).requires_grad_()
    upstream = torch.randn(batch, channels, stride * size, stride * size).to(dtype).contiguous(
        memory_format=torch.channels_last)
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def forward(polyphase: bool) -> torch.Tensor:
        with torch.autocast(**autocast):
            if polyphase:
                return polyphase_conv_transpose2d(x, weight, None, stride)
            return F.conv_transpose2d(x, weight, stride=stride, padding=stride // 2)

    def inference(polyphase: bool) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return forward(polyphase)
        return call

    def training(polyphase: bool) -> Callable[[], object]:
        return lambda: torch.autograd.grad(forward(polyphase), (x, weight), upstream)

    calls = {"forward, oneDNN": inference(False), "forward, phases": inference(True),
             "training, oneDNN": training(False), "training, phases": training(True)}
    seconds, _ = interleaved(list(calls.values()), rounds)
    return {name: 1e3 * median for name, median in zip(calls, seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", choices=["bf16", "32", "both"], default="both")
    args = parser.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"bf16": [torch.bfloat16], "32": [torch.float32], "both": [torch.bfloat16, torch.float32]}[args.precision]
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.rounds} rounds, ms\n")
    print("| precision | stride | input | channels | forward: oneDNN / phases | forward + backward: oneDNN / phases |")
    print("|---|---|---|---|---|---|")
    for dtype in dtypes:
        for stride, size, channels in LAYERS:
            ms = measure(stride, size, channels, args.batch, dtype, args.rounds)
            name = "bf16" if dtype == torch.bfloat16 else "float32"
            print(f"| {name} | {stride} | {size} x {size} | {channels} | {ms['forward, oneDNN']:.1f} / "
                  f"{ms['forward, phases']:.1f} | {ms['training, oneDNN']:.1f} / {ms['training, phases']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
