"""The soft overlap losses on a map of class scores, loss and gradient: PyTorch's operators for
their sums (softmax, masking, gather, scatter-adds, sum, and their backward) against
`seglab.ops.overlap_sums`' one native pass each way, and for `ce+dice` against both losses in
one shared pass (`WeightedSum`, `native_cross_entropy_overlap_sums`). Not a test: it prints a
Markdown table.

    python benchmarks/overlap_losses.py              # `dice` and `ce+dice`, 21 classes at 512 x 512
    python benchmarks/overlap_losses.py --rounds 15

Each row times forward + backward of the routes on the same channels-last scores, in
interleaved rounds (`benchmarks/winograd.py`'s `interleaved`), with the scores as seglab's
trainer hands them to the loss (`float32_logits_for`). Where `ce+dice`'s terms go apart, the
sum computes from one float32 copy of bf16 scores.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from winograd import interleaved, interleaved_arguments  # benchmarks/winograd.py: one warm-up call, then rounds of one call each

import seglab.losses._inputs as inputs
import seglab.losses.factory as factory
from seglab.losses import build_loss, float32_logits_for
from seglab.ops.overlap_sums import takes_native_overlap_sums

# (batch, classes, size): the bench's training batch with VOC's 21 classes, Cityscapes' 19,
# ADE20K's 150 (a pixel's classes in vectors), and the quick start's batch of 6 classes at 64 x 64.
CASES = [(4, 21, 512), (4, 19, 512), (2, 150, 512), (16, 6, 64)]


@contextlib.contextmanager
def apart(pytorchs_sums: bool) -> Iterator[None]:
    """Within the block, the terms of a sum of losses each on its own, and with `pytorchs_sums`
    the overlap losses' sums by PyTorch's operators."""
    saved = inputs.takes_native_overlap_sums, factory.WeightedSum._shared_pass_pair
    factory.WeightedSum._shared_pass_pair = lambda *args: None  # type: ignore[method-assign]
    if pytorchs_sums:
        inputs.takes_native_overlap_sums = lambda *args: False
    try:
        yield
    finally:
        inputs.takes_native_overlap_sums, factory.WeightedSum._shared_pass_pair = saved


def measure(spec: str, batch: int, classes: int, size: int, dtype: torch.dtype, rounds: int) -> list[float]:
    """Milliseconds by PyTorch's sums, by the native sums (each term apart), and, for a sum of
    cross-entropy and an overlap loss, by the shared pass."""
    generator = torch.Generator().manual_seed(0)
    scores = (3 * torch.randn(batch, classes, size, size, generator=generator)).to(dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    target = torch.randint(0, classes, (batch, size, size), generator=generator)
    assert takes_native_overlap_sums(scores, target)
    loss = build_loss(spec, num_classes=classes)

    def as_trained() -> object:
        return torch.autograd.grad(loss(float32_logits_for(loss, scores), target), scores)

    def routed(pytorchs_sums: bool):
        def call() -> object:
            with apart(pytorchs_sums):
                return as_trained()
        return call

    calls = [routed(True), routed(False)]
    if "+" in spec:
        calls.append(as_trained)
    seconds, _ = interleaved(calls, rounds)
    return [1e3 * s for s in seconds]


def main() -> None:
    args = interleaved_arguments(__doc__.split("\n\n")[0])
    print("| loss | scores | batch | classes | map | PyTorch's sums | native sums | shared pass | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in ("dice", "ce+dice"):
        for dtype in (torch.float32, torch.bfloat16):
            for batch, classes, size in CASES:
                times = measure(spec, batch, classes, size, dtype, args.rounds)
                shared = f"{times[2]:.1f}" if len(times) > 2 else "-"
                name = "bf16" if dtype == torch.bfloat16 else "float32"
                print(f"| {spec} | {name} | {batch} | {classes} | {size} x {size} | {times[0]:.1f} | {times[1]:.1f} | "
                      f"{shared} | {times[0] / times[-1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
