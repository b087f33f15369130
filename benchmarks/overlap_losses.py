"""The soft overlap losses on a map of class scores, loss and gradient: PyTorch's operators for
their sums (softmax, masking, gather, scatter-adds, sum, and their backward) against
`seglab.ops.overlap_sums`' one native pass each way. Not a test: it prints a Markdown table.

    python benchmarks/overlap_losses.py              # `dice` and `ce+dice`, 21 classes at 512 x 512
    python benchmarks/overlap_losses.py --rounds 15

Each row times forward + backward of both routes on the same channels-last scores, in
interleaved rounds (`benchmarks/winograd.py`'s `interleaved`), with the scores as seglab's
trainer hands them to the loss: bf16 ones copied to float32 first where the loss does not
upcast them itself (`float32_logits_for`; `ce+dice` is a sum of two terms).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from winograd import interleaved_arguments, interleaved_ms  # benchmarks/winograd.py: one warm-up call, then rounds of one call each

import seglab.losses._inputs as inputs
import seglab.losses.overlap as overlap
from seglab.losses import build_loss, float32_logits_for
from seglab.ops.overlap_sums import takes_native_overlap_sums

# (batch, classes, size): the bench's training batch with VOC's 21 classes, Cityscapes' 19, and
# the quick start's batch of 6 classes at 64 x 64.
CASES = [(4, 21, 512), (4, 19, 512), (16, 6, 64)]


@contextlib.contextmanager
def pytorchs_operators() -> Iterator[None]:
    """The losses' sums by PyTorch's operators within the block."""
    saved = overlap.takes_native_overlap_sums, inputs.takes_native_overlap_sums
    overlap.takes_native_overlap_sums = inputs.takes_native_overlap_sums = lambda *args: False
    try:
        yield
    finally:
        overlap.takes_native_overlap_sums, inputs.takes_native_overlap_sums = saved


def measure(spec: str, batch: int, classes: int, size: int, dtype: torch.dtype, rounds: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    scores = (3 * torch.randn(batch, classes, size, size, generator=generator)).to(dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    target = torch.randint(0, classes, (batch, size, size), generator=generator)
    assert takes_native_overlap_sums(scores, target)
    loss = build_loss(spec, num_classes=classes)

    def native() -> object:
        return torch.autograd.grad(loss(float32_logits_for(loss, scores), target), scores)

    def pytorch() -> object:
        with pytorchs_operators():
            return native()

    return interleaved_ms(pytorch, native, rounds)


def main() -> None:
    args = interleaved_arguments(__doc__.split("\n\n")[0])
    print("| loss | scores | batch | classes | map | PyTorch's sums | native | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in ("dice", "ce+dice"):
        for dtype in (torch.float32, torch.bfloat16):
            for batch, classes, size in CASES:
                pytorch, native = measure(spec, batch, classes, size, dtype, args.rounds)
                name = "bf16" if dtype == torch.bfloat16 else "float32"
                print(f"| {spec} | {name} | {batch} | {classes} | {size} x {size} | {pytorch:.1f} | {native:.1f} | "
                      f"{pytorch / native:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
