"""The class scores' bilinear upsampling in training, forward and backward: `F.interpolate` and
its backward against `seglab.ops.upsample.upsample_scores`' native route (`resize_bilinear` and
`resize_bilinear_backward`). Not a test: it prints a Markdown table.

    python benchmarks/score_upsampling.py            # 21 classes to 512 x 512 from strides 4 and 8
    python benchmarks/score_upsampling.py --rounds 15

Each row times forward + backward of both on the same channels-last float32 scores and the same
channels-last gradient (the native cross-entropy's layout), in interleaved rounds
(`benchmarks/winograd.py`'s `interleaved`).
"""
from __future__ import annotations


import torch
from winograd import interleaved_arguments, interleaved_ms  # benchmarks/winograd.py: one warm-up call, then rounds of one call each

from seglab.ops.upsample import native_score_upsampling, upsample_scores

# (batch, classes, source side, output side): the bench's training batch at strides 4 (SegFormer,
# FPN, DeepLab v3+) and 8 (PSPNet and DeepLab v3 at output stride 8), and the quick start's size.
CASES = [(4, 21, 128, 512), (4, 21, 64, 512), (1, 21, 128, 512), (16, 6, 16, 64)]


def measure(batch: int, classes: int, side: int, size: int, rounds: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(batch, classes, side, side, generator=generator).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(batch, size, size, classes, generator=generator).permute(0, 3, 1, 2)

    def native() -> object:
        return torch.autograd.grad(upsample_scores(scores, (size, size)), scores, grad)

    def pytorch() -> object:
        with native_score_upsampling(False):
            return native()

    return interleaved_ms(pytorch, native, rounds)


def main() -> None:
    args = interleaved_arguments(__doc__.split("\n\n")[0])
    print("| batch | classes | from | to | F.interpolate | native | ratio |")
    print("|---|---|---|---|---|---|---|")
    for batch, classes, side, size in CASES:
        pytorch, native = measure(batch, classes, side, size, args.rounds)
        print(f"| {batch} | {classes} | {side} x {side} | {size} x {size} | {pytorch:.1f} | {native:.1f} | "
              f"{pytorch / native:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
