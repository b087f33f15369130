"""Multi-head attention of many tokens over few keys by the native kernel (`native.attention`),
for SegFormer's efficient self-attention in bf16 CPU inference.

The Mix Transformer's attention takes 16,384 queries over 256 keys of 32 channels per head
in MiT-B0's first stage (a 512 x 512 input). PyTorch's CPU flash attention ran that in bf16
slower than in float32 (Zen 4, batch 8: 44.6 against 33.0 ms), a quarter of the processor's
bf16 rate, and the four stages' attention took 38% of the bf16 network's time. The native
kernel multiplies bf16 pairs by AVX-512 BF16's VDPBF16PS, keeps a block of queries' scores in
a core's cache for the float32 softmax, and writes the heads straight back as tokens: 1.45-1.65x
PyTorch's bf16 attention on MiT-B0's four stages at batch 1 and 8, SegFormer-B0 1.17-1.19x
faster whole (`benchmarks/segformer_blocks.py`, docs/bench.md). In float32 it ran 0.84-1.06x
PyTorch's, so float32 keeps PyTorch's.
"""
from __future__ import annotations

import torch

from seglab.ops import native
from seglab.ops.grad_mode import records_gradients

__all__ = ["attention_fits", "native_attention_available"]


def native_attention_available() -> bool:
    """The native kernels built, with bf16 products by pairs (AVX-512 BF16)."""
    return native.bf16_pairs()  # (False where the kernels are not built)


def attention_fits(queries: torch.Tensor, keys_values: torch.Tensor, heads: int) -> bool:
    """Whether `native.attention` computes these heads here: bf16 CPU inference (no gradient
    recorded), N x L x C queries and N x S x 2C keys and values, heads of a whole number of
    16-channel vectors, the native kernels built with bf16 pair products."""
    return (queries.device.type == "cpu" and queries.dtype == torch.bfloat16 and queries.dim() == 3
            and keys_values.device.type == "cpu" and keys_values.dtype == torch.bfloat16
            and keys_values.dim() == 3 and keys_values.shape[0] == queries.shape[0]
            and keys_values.shape[1] >= 1 and keys_values.shape[2] == 2 * queries.shape[2]
            and heads >= 1 and queries.shape[2] % heads == 0
            and (queries.shape[2] // heads) % native.ATTENTION_HEAD_MULTIPLE == 0
            and not records_gradients(queries, keys_values) and native_attention_available())
