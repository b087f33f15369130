"""Cross-entropy on a map of class scores, loss and gradient: PyTorch's operators as seglab's
trainer ran them before (the scores copied to float32, log-softmax over each pixel's classes,
nll_loss, and their backward) against `seglab.ops.cross_entropy`'s one native pass. Not a
test: it prints a Markdown table.

    python benchmarks/cross_entropy.py              # 21 classes at 512 x 512, batches 1 and 4
    python benchmarks/cross_entropy.py --rounds 15

Each row times forward + backward of both on the same channels-last scores, in interleaved
rounds so that a change of machine load hits both (`benchmarks/winograd.py`'s `interleaved`),
and prints the medians.
"""
from __future__ import annotations


import torch
from winograd import interleaved_arguments, interleaved_ms  # benchmarks/winograd.py: one warm-up call, then rounds of one call each

from seglab.losses.pixelwise import pixel_cross_entropy
from seglab.ops.cross_entropy import native_cross_entropy, takes_native_cross_entropy

# (batch, classes, size): the bench's training batch and a single image at 512 x 512 with VOC's
# 21 classes, Cityscapes' 19, ADE20K's 150, and a small map of few classes.
CASES = [(4, 21, 512), (1, 21, 512), (4, 19, 512), (2, 150, 256), (8, 6, 128)]


def measure(batch: int, classes: int, size: int, dtype: torch.dtype, rounds: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    scores = (3 * torch.randn(batch, classes, size, size, generator=generator)).to(dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    target = torch.randint(0, classes, (batch, size, size), generator=generator)
    assert takes_native_cross_entropy(scores, target)

    def pytorch() -> object:
        return torch.autograd.grad(pixel_cross_entropy(scores.float(), target).mean(), scores)

    def native() -> object:
        return torch.autograd.grad(native_cross_entropy(scores, target), scores)

    return interleaved_ms(pytorch, native, rounds)


def main() -> None:
    args = interleaved_arguments(__doc__.split("\n\n")[0])
    print("| scores | batch | classes | map | PyTorch | native | ratio |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for batch, classes, size in CASES:
            pytorch, native = measure(batch, classes, size, dtype, args.rounds)
            name = "bf16" if dtype == torch.bfloat16 else "float32"
            print(f"| {name} | {batch} | {classes} | {size} x {size} | {pytorch:.1f} | {native:.1f} | "
                  f"{pytorch / native:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
