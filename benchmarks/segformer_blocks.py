"""SegFormer's native blocks (`seglab.engine.fastpath.use_native_segformer`) against the
PyTorch operators the fast path otherwise runs, one block at a time at MiT-B0's shapes for a
512 x 512 input: the figures behind `MAX_NATIVE_MIX_FFN_WEIGHTS` and the step itself. Not a
test: it prints Markdown tables.

    python benchmarks/segformer_blocks.py              # batch 1 and 8
    python benchmarks/segformer_blocks.py --rounds 15 --threads 2

- Mix-FFN: LayerNorm, fc1, depthwise 3x3 + GELU (one oneDNN kernel, as `fuse_conv_relu` makes
  it), fc2 and the residual addition, against `native.mix_ffn`; in float32, and in bf16 where
  the processor has AVX-512 BF16's pair products.
- Attention's output projection plus the residual, against `native.linear`.
- The decoder head at stride 4 (the first stage's share, the upsampled shares summed with the
  ReLU, the classifier), against `native.mlp_head`.
- The attention heads over the shrunk keys (`F.scaled_dot_product_attention` of the heads and
  their transpose back to tokens), against `native.attention`, in bf16 (the fast path's use,
  by pair products where the processor has AVX-512 BF16) and in float32 (for the record: there
  the fast path keeps PyTorch's).

Each row times both in interleaved rounds and reports the median over rounds of the operators'
time / the native time.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.encoders.mit import MIT_CONFIGS, MixFFN
from seglab.engine.onednn import FusedConv
from seglab.ops import native
from seglab.ops.bilinear import add_bilinear_upsampled_
from winograd import interleaved, interleaved_arguments

SIDES = (128, 64, 32, 16)  # MiT's stage maps for a 512 x 512 input


def _row(name: str, operators, natively, rounds: int) -> str:
    seconds, ratios = interleaved([operators, natively], rounds)
    return f"| {name} | {seconds[0] * 1e3:.2f} | {seconds[1] * 1e3:.2f} | {ratios[1]:.2f}x |"


def mix_ffn_rows(batch: int, rounds: int, dtype: torch.dtype = torch.float32) -> list[str]:
    rows = []
    for side, width in zip(SIDES, MIT_CONFIGS["mit_b0"].widths):
        torch.manual_seed(0)
        ffn, norm = MixFFN(width, 4 * width).eval(), nn.LayerNorm(width)
        fused = MixFFN(width, 4 * width).eval()  # the fast path's operators: conv + GELU in one kernel
        fused.load_state_dict(ffn.state_dict())
        fused.dwconv, fused.act = FusedConv(fused.dwconv, fused.act, prepack=True), nn.Identity()
        ffn, norm, fused = ffn.to(dtype), norm.to(dtype), fused.to(dtype)
        ffn.native = True
        tokens = torch.randn(batch, side * side, width).to(dtype)

        def operators() -> None:
            with torch.inference_mode():
                fused(tokens, side, side, residual=tokens, norm=norm)

        def natively() -> None:
            with torch.inference_mode():
                ffn(tokens, side, side, residual=tokens, norm=norm)

        name = "" if dtype == torch.float32 else ", bf16"
        rows.append(_row(f"Mix-FFN{name} {width} -> {4 * width} on {side} x {side}", operators, natively, rounds))
    return rows


def projection_rows(batch: int, rounds: int) -> list[str]:
    rows = []
    for side, width in zip(SIDES, MIT_CONFIGS["mit_b0"].widths):
        torch.manual_seed(0)
        layer, tokens = nn.Linear(width, width), torch.randn(batch, side * side, width)
        residual = torch.randn_like(tokens)
        weight_t, bias = layer.weight.detach().t().contiguous(), layer.bias.detach()

        def operators() -> None:
            with torch.inference_mode():
                residual + layer(tokens)

        def natively() -> None:
            native.linear(tokens, weight_t, bias, residual=residual)

        rows.append(_row(f"projection {width} -> {width} + residual on {side} x {side}", operators, natively, rounds))
    return rows


def head_row(batch: int, rounds: int, dim: int = 256, classes: int = 21) -> str:
    torch.manual_seed(0)
    widths = MIT_CONFIGS["mit_b0"].widths
    first = torch.randn(batch, widths[0], SIDES[0], SIDES[0]).contiguous(memory_format=torch.channels_last)
    shares = [torch.randn(batch, dim, side, side).contiguous(memory_format=torch.channels_last) for side in SIDES[1:]]
    first_weight, first_bias = torch.randn(dim, widths[0]) / widths[0] ** 0.5, torch.randn(dim)
    classifier = nn.Conv2d(dim, classes, 1).eval()

    def operators() -> None:
        with torch.inference_mode():
            fused = F.conv2d(first, first_weight[:, :, None, None], first_bias)
            classifier(add_bilinear_upsampled_(fused, shares, relu=True))

    nhwc = [s.permute(0, 2, 3, 1) for s in shares]
    weights = (first_weight.t().contiguous(), first_bias, nhwc, classifier.weight.detach().flatten(1).t().contiguous(),
               classifier.bias.detach())

    def natively() -> None:
        native.mlp_head(first.permute(0, 2, 3, 1), weights[0], weights[1], weights[2], weights[3], weights[4])

    return _row(f"decoder head {widths[0]} -> {dim} -> {classes} on {SIDES[0]} x {SIDES[0]}", operators, natively,
                rounds)


def attention_rows(batch: int, rounds: int) -> list[str]:
    rows = []
    config = MIT_CONFIGS["mit_b0"]
    for dtype in (torch.bfloat16, torch.float32):
        for side, width, heads, reduction in zip(SIDES, config.widths, config.heads, config.reductions):
            torch.manual_seed(0)
            keys = (side // reduction) ** 2
            queries = torch.randn(batch, side * side, width).to(dtype)
            keys_values = torch.randn(batch, keys, 2 * width).to(dtype)
            head = width // heads

            def operators() -> None:
                with torch.inference_mode():
                    q = queries.reshape(batch, -1, heads, head).transpose(1, 2)
                    k, v = keys_values.reshape(batch, keys, 2, heads, head).permute(2, 0, 3, 1, 4)
                    F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, width)

            def natively() -> None:
                native.attention(queries, keys_values, heads)

            name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16")
            rows.append(_row(f"attention, {name}: {side * side} queries over {keys} keys, {heads} x {head} channels",
                             operators, natively, rounds))
    return rows


def main() -> None:
    args = interleaved_arguments(__doc__.split("\n\n")[0], rounds=9, timed="inference")
    if not native.available():
        raise SystemExit(f"the native kernels are not available: {native.unavailable_reason()}")
    print(f"bf16 attention by {'pair products (AVX-512 BF16)' if native.bf16_pairs() else 'float32 products'}")
    for batch in (1, 8):
        print(f"\nbatch {batch}\n\n| block | operators, ms | native, ms | operators / native |\n|---|---|---|---|")
        for line in (*mix_ffn_rows(batch, args.rounds), *projection_rows(batch, args.rounds),
                     head_row(batch, args.rounds), *attention_rows(batch, args.rounds),
                     *(mix_ffn_rows(batch, args.rounds, torch.bfloat16) if native.bf16_pairs() else ())):
            print(line, flush=True)


if __name__ == "__main__":
    main()
