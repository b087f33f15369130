"""DeepLab's ASPP convolutions in float32 training: Winograd over the map's phases, the per-tap
windows in float32, and the windows with int8 forward and input-gradient products
(`seglab.ops.atrous_gemm.windowed_gemm_conv(..., int8=True)`), their weight gradient by the
float32 windows or by Winograd (`weight_tile`). Not a test: it prints a Markdown table of
forward + backward seconds per dilation, the routes interleaved in every round, and each
route's error against float64.

    python benchmarks/int8_atrous.py
    python benchmarks/int8_atrous.py --dilations 6,12,18 --size 32 --in-channels 512

The defaults are DeepLabV3-R50's ASPP at output stride 8 on a 512 x 512 image: 2048 -> 256
channels on 64 x 64 maps, dilations 12, 24 and 36, batch 4. The saving is Winograd's
multiply-adds against the windows', with the tile that does fewest: the training route takes
that tile where it saves at least `MIN_ATROUS_SAVING` (`seglab.engine.winograd.atrous_output_tile`);
with int8 products, for the weight's gradient only.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from seglab.engine.winograd import atrous_saving
from seglab.memory import keep_freed_memory
from seglab.ops.atrous_gemm import share_inside, windowed_gemm_conv
from seglab.ops.winograd import winograd_conv3x3, winograd_filters

Conv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def routes(tile: int) -> dict[str, Conv]:
    return {
        f"Winograd F({tile}x{tile})": lambda x, w, b, d: winograd_conv3x3(x, winograd_filters(w, tile), b, d),
        "windows, float32": lambda x, w, b, d: windowed_gemm_conv(x, w, b, (d, d)),
        "windows, int8 products": lambda x, w, b, d: windowed_gemm_conv(x, w, b, (d, d), int8=True),
        f"windows, int8 products, weight gradient by F({tile}x{tile})":
            lambda x, w, b, d: windowed_gemm_conv(x, w, b, (d, d), int8=True, weight_tile=tile),
    }


def step(conv: Conv, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor,
         dilation: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds of one forward + backward, and (output, input gradient, weight gradient)."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    start = time.perf_counter()
    out = conv(x, weight, bias, dilation)
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad)
    return time.perf_counter() - start, [out.detach(), grad_x, grad_w]


def relative_errors(results: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    return [((a.double() - r).norm() / r.norm()).item() for a, r in zip(results, reference)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dilations", default="12,24,36")
    parser.add_argument("--size", type=int, default=64, help="the map's height and width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--in-channels", type=int, default=2048)
    parser.add_argument("--out-channels", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as seglab's commands run: no page faults on every fresh large tensor
    torch.manual_seed(0)
    shape = (args.batch, args.in_channels, args.size, args.size)
    x = torch.randn(shape).relu().contiguous(memory_format=torch.channels_last)  # post-ReLU, as in the net
    weight = torch.randn(args.out_channels, args.in_channels, 3, 3) / (9 * args.in_channels) ** 0.5
    bias = torch.zeros(args.out_channels)
    print(f"{args.batch} x {args.in_channels} x {args.size} x {args.size} -> {args.out_channels}, "
          f"{torch.get_num_threads()} threads; forward + backward seconds, median of {args.rounds} "
          "interleaved rounds; relative error against float64 (output / input gradient / weight gradient)\n")
    print("| dilation | share inside | Winograd saving | route | seconds | error |")
    print("|---|---|---|---|---|---|")
    for dilation in (int(d) for d in args.dilations.split(",")):
        saving, tile = atrous_saving(shape, dilation)
        grad = torch.randn(args.batch, args.out_channels, args.size, args.size).contiguous(memory_format=torch.channels_last)
        x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
        out64 = F.conv2d(x64, w64, bias.double(), padding=dilation, dilation=dilation)
        reference = [out64.detach(), *torch.autograd.grad(out64, (x64, w64), grad.double())]
        convs = routes(tile)
        times: dict[str, list[float]] = {name: [] for name in convs}
        errors: dict[str, list[float]] = {}
        for round_ in range(args.rounds + 1):  # the first round warms up
            for name, conv in convs.items():
                seconds, results = step(conv, x, weight, bias, grad, dilation)
                if round_:
                    times[name].append(seconds)
                if round_ == args.rounds:  # the last round's results, against float64 once
                    errors[name] = relative_errors(results, reference)
        share = share_inside(args.size, args.size, (3, 3), (dilation, dilation))
        for name in convs:
            error = " / ".join(f"{e:.1e}" for e in errors[name])
            print(f"| {dilation} | {share:.2f} | {saving:.2f} | {name} | {statistics.median(times[name]):.3f} | {error} |")


if __name__ == "__main__":
    main()
