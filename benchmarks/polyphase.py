"""The transposed convolution of kernel 2s and stride s (FCN's upsampling) by oneDNN's own
kernel against the phase convolution of `seglab.ops.polyphase`, one layer at a time, channels
last: the figures behind `MIN_STRIDE`. Not a test: it prints a Markdown table.

    python benchmarks/polyphase.py                   # FCN's layers at a 512 x 512 input
    python benchmarks/polyphase.py --rounds 9 --batch 1
    python benchmarks/polyphase.py --fixed           # the bilinear filter held fixed (FCN's final
                                                     # layer): also as interpolation, input gradient only

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
from seglab.ops.upsample import bilinear_kernel, upsample_scores

# (stride, input map size, channels): FCN-8s's, -16s's and -32s's final upsampling of 21 class
# scores to 512 x 512, the x2 steps between them, and a wider map of scores.
LAYERS = [(8, 64, 21), (16, 32, 21), (32, 16, 21), (2, 16, 21), (2, 32, 21), (4, 32, 21), (8, 64, 64)]


def measure(stride: int, size: int, channels: int, batch: int, dtype: torch.dtype, rounds: int,
            fixed: bool = False) -> dict[str, float]:
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    if fixed:  # the bilinear filter, no weight gradient; interpolation computes the same interior
        weight = bilinear_kernel(channels, channels, 2 * stride)
    else:
        weight = (torch.randn(channels, channels, 2 * stride, 2 * stride) * 0.01).requires_grad_()
    upstream = torch.randn(batch, channels, stride * size, stride * size).to(dtype).contiguous(
        memory_format=torch.channels_last)
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def forward(route: str) -> torch.Tensor:
        with torch.autocast(**autocast):
            if route == "phases":
                return polyphase_conv_transpose2d(x, weight, None, stride)
            if route == "interpolation":
                return upsample_scores(x, (stride * size, stride * size))
            return F.conv_transpose2d(x, weight, stride=stride, padding=stride // 2)

    def inference(route: str) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                return forward(route)
        return call

    wanted = (x,) if fixed else (x, weight)
    upstream_float = upstream.float()  # interpolation's output is float32 (upsample_scores)

    def training(route: str) -> Callable[[], object]:
        def call() -> object:
            out = forward(route)
            return torch.autograd.grad(out, wanted, upstream_float if out.dtype == torch.float32 else upstream)
        return call

    routes = ["oneDNN", "phases"] + (["interpolation"] if fixed else [])
    calls = {**{f"forward, {r}": inference(r) for r in routes}, **{f"training, {r}": training(r) for r in routes}}
    seconds, _ = interleaved(list(calls.values()), rounds)
    return {name: 1e3 * median for name, median in zip(calls, seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", choices=["bf16", "32", "both"], default="both")
    parser.add_argument("--fixed", action="store_true",
                        help="the bilinear filter held fixed: input gradient only, and interpolation as a third route")
    args = parser.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"bf16": [torch.bfloat16], "32": [torch.float32], "both": [torch.bfloat16, torch.float32]}[args.precision]
    routes = "oneDNN / phases" + (" / interpolation" if args.fixed else "")
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.rounds} rounds, ms"
          + (", the bilinear filter fixed" if args.fixed else "") + "\n")
    print(f"| precision | stride | input | channels | forward: {routes} | forward + backward: {routes} |")
    print("|---|---|---|---|---|---|")
    for dtype in dtypes:
        for stride, size, channels in LAYERS:
            ms = measure(stride, size, channels, args.batch, dtype, args.rounds, fixed=args.fixed)
            name = "bf16" if dtype == torch.bfloat16 else "float32"
            forward = " / ".join(f"{value:.1f}" for key, value in ms.items() if key.startswith("forward"))
            training = " / ".join(f"{value:.1f}" for key, value in ms.items() if key.startswith("training"))
            print(f"| {name} | {stride} | {size} x {size} | {channels} | {forward} | {training} |", flush=True)


if __name__ == "__main__":
    main()
