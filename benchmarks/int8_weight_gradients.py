"""Could a 1x1 convolution's weight gradient be an int8 product too? The error it would have,
measured on real gradients: why `seglab.ops.int8_products` keeps it float32. Not a test: it
prints a Markdown table.

    python benchmarks/int8_weight_gradients.py
    python benchmarks/int8_weight_gradients.py --steps 3 --size 256 --batch 4

grad_W = G^T X sums over every pixel of the batch (G pixels x C_out, X pixels x C_in). An int8
product needs scales that factor out of that sum: one per channel of each factor, over a block
of K pixels, the blocks' int32 products scaled and added in float32. DeepLabV3-R50 (output
stride 8) takes a few SGD steps on random images and labels, then the backward's X and G of
its large 1x1 convolutions (those the int8 products take) are kept, and grad_W is summed in
float64 from the blocks' int8 products (`int8_product`: the int8 products' own quantizer and
`torch._int_mm`) for several K. For scale: the same product from bf16-rounded factors, and the
forward and input gradient of `int8_products`, whose row scales give about 0.5% and 1%.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.models.registry import create_model
from seglab.ops.int8_products import int8_product, takes_int8_pointwise
from seglab.ops.layout import pixel_rows

BLOCKS = (64, 256, 1024, 4096)


def block_quantized_product(g: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor:
    """G^T X with each block of `block` pixels quantized per channel: per block, the int8
    products' own `int8_product` of the channels-by-pixels factors (a row per channel, one
    scale each), the blocks' results added in float64."""
    total = torch.zeros(g.shape[1], x.shape[1], dtype=torch.float64)
    for start in range(0, len(g), block):
        channels_by_pixels = [factor[start : start + block].t().float().contiguous() for factor in (g, x)]
        total += int8_product(*channels_by_pixels).double()
    return total


def captured_factors(steps: int, size: int, batch: int, keep: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(G, X) as pixels x channels, float64, of the last `keep` large 1x1 convolutions' backward."""
    torch.manual_seed(0)
    model = create_model("deeplabv3", encoder="resnet50", num_classes=21, output_stride=8)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    inputs: dict[int, torch.Tensor] = {}
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_input(conv: nn.Module, args: tuple, _out: torch.Tensor) -> None:
        if takes_int8_pointwise(conv, args[0]):
            inputs[id(conv)] = args[0]

    def keep_gradient(conv: nn.Module, _grad_in: tuple, grad_out: tuple) -> None:
        if id(conv) in inputs:
            captured.append((pixel_rows(grad_out[0].detach()).double(), pixel_rows(inputs[id(conv)].detach()).double()))

    for conv in convs:
        conv.register_forward_hook(keep_input)
        conv.register_full_backward_hook(keep_gradient)
    labels = torch.randint(0, 21, (batch, size, size))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        inputs.clear()
        captured.clear()
        output = model(x)
        loss = F.cross_entropy(output["out"] if isinstance(output, dict) else output, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return captured[:keep]  # the backward meets the last convolutions first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--convolutions", type=int, default=6, help="how many of the last large 1x1 convolutions")
    args = parser.parse_args()
    print("| G (pixels x C_out) | X (pixels x C_in) | " + " | ".join(f"K = {k}" for k in BLOCKS)
          + " | bf16 factors |")
    print("|---" * (len(BLOCKS) + 3) + "|")
    for g, x in captured_factors(args.steps, args.size, args.batch, args.convolutions):
        exact = g.t() @ x

        def relative(approximate: torch.Tensor) -> str:
            return f"{float((approximate - exact).norm() / exact.norm()):.2%}"

        bf16 = g.bfloat16().double().t() @ x.bfloat16().double()
        row = [relative(block_quantized_product(g, x, k)) for k in BLOCKS] + [relative(bf16)]
        print(f"| {tuple(g.shape)} | {tuple(x.shape)} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
