"""BatchNorm in training with what follows it in a ResNet, forward and backward: PyTorch's
operators (nn.BatchNorm2d, the shortcut addition, the ReLU) against `seglab.ops.batch_norm`'s
native kernel. Not a test: it prints a Markdown table.

    python benchmarks/batch_norm.py                 # bf16 and float32, the maps of a ResNet at batch 4
    python benchmarks/batch_norm.py --rounds 15

Each row times forward + backward of both on the same channels-last maps in interleaved rounds
(`benchmarks/winograd.py`'s `interleaved`), two maps taking turns so that each call reads from
memory rather than cache, as in a training step, and prints the medians.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from winograd import interleaved_arguments, interleaved_ms  # benchmarks/winograd.py: one warm-up call, then rounds of one call each

from seglab.ops.batch_norm import batch_norm_act, takes_native_batch_norm

# (batch, channels, size): a U-Net decoder's full-size 16-channel map, then a ResNet's maps at a
# 512 x 512 input (a Bottleneck's inner widths and its outputs, 64 to 2048 channels).
CASES = [(4, 16, 512), (4, 64, 128), (4, 256, 128), (4, 128, 64), (4, 512, 64), (4, 1024, 32), (4, 2048, 16)]


def measure(batch: int, channels: int, size: int, dtype: torch.dtype, shortcut: bool,
            rounds: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)

    def new_map() -> torch.Tensor:
        return torch.randn(batch, channels, size, size, generator=generator).to(dtype).contiguous(
            memory_format=torch.channels_last)

    norm = nn.BatchNorm2d(channels)
    maps = [new_map().requires_grad_() for _ in range(2)]
    shortcuts = [new_map() if shortcut else None for _ in range(2)]
    grad = new_map()
    # (float32 maps do not take the route, `_ROUTED_DTYPES`; timed here to show why)
    assert takes_native_batch_norm(maps[0], norm, shortcuts[0]) == (dtype == torch.bfloat16)
    turns = itertools.cycle([0, 1])

    def pytorch() -> object:
        k = next(turns)
        y = norm(maps[k])
        y = torch.relu_(y if shortcuts[k] is None else y + shortcuts[k])
        return torch.autograd.grad(y, maps[k], grad)

    def native() -> object:
        k = next(turns)
        return torch.autograd.grad(batch_norm_act(maps[k], norm, relu=True, shortcut=shortcuts[k]), maps[k], grad)

    return interleaved_ms(pytorch, native, rounds)


def main() -> None:
    args = interleaved_arguments(__doc__.split("\n\n")[0])
    print("| maps | map (N x C x H x W) | after the norm | PyTorch | native | ratio |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for (batch, channels, size), shortcut in itertools.product(CASES, (False, True)):
            pytorch, native = measure(batch, channels, size, dtype, shortcut, args.rounds)
            name = "bf16" if dtype == torch.bfloat16 else "float32"
            after = "+ shortcut, ReLU" if shortcut else "ReLU"
            print(f"| {name} | {batch} x {channels} x {size} x {size} | {after} | {pytorch:.2f} | {native:.2f} | "
                  f"{pytorch / native:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
