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

Training (`native_training_attention`) runs the same kernel forward, which also writes the
softmax P out (bf16, rounded once), and backward, in one native pass over each block of 64
queries (`native.attention_grads`):
    dS = P (dP - the P-weighted mean of dP), dP = dO V^T,
    dQ = s dS K,  dK = s dS^T Q,  dV = P^T dO,
dS never written out: each block's rows of dS (rounded once) and of P multiply the block's Q,
dO and K while in cache, by pairs into float32; dK and dV as float32 sums per range of blocks,
added and rounded once at the end. The kernel takes dP by pair products into float32 and the
mean over the stored weights' own sum, so dS's error is bf16's share of dP's spread. PyTorch's bf16
operators round dP first, and its flash attention takes the mean as dO . O from the bf16
output: both put 2^-8 of dP itself into the difference, which cancels to rounding where a row's
values are alike, as SegFormer's few pooled keys' can be (queries' gradient 8-12% off on such
rows, against 0.3%). Flash attention keeps only each row's log-sum-exp and recomputes the rest
in blocks on the way back; with few keys the whole softmax is small enough to keep (MiT-B0's
first stage at batch 4: 32 MB).
"""
from __future__ import annotations

import torch

from seglab.ops import native
from seglab.ops.grad_mode import records_gradients

__all__ = ["MAX_KEPT_PROBABILITIES", "attention_fits", "native_attention_available", "native_training_attention",
           "training_attention_fits"]

# The softmax a training step keeps for its backward pass (N x heads x L x S bf16 values): at
# most this many per call (128 MB); beyond it PyTorch's flash attention, which keeps none, runs.
MAX_KEPT_PROBABILITIES = 2 ** 26


def native_attention_available() -> bool:
    """The native kernels built, with bf16 products by pairs (AVX-512 BF16)."""
    return native.bf16_pairs()  # (False where the kernels are not built)


def _heads_fit(queries: torch.Tensor, keys_values: torch.Tensor, heads: int) -> bool:
    """bf16 CPU tensors, N x L x C queries and N x S x 2C keys and values, heads of a whole number
    of 16-channel vectors, the native kernels built with bf16 pair products."""
    return (queries.device.type == "cpu" and queries.dtype == torch.bfloat16 and queries.dim() == 3
            and keys_values.device.type == "cpu" and keys_values.dtype == torch.bfloat16
            and keys_values.dim() == 3 and keys_values.shape[0] == queries.shape[0]
            and keys_values.shape[1] >= 1 and keys_values.shape[2] == 2 * queries.shape[2]
            and heads >= 1 and queries.shape[2] % heads == 0
            and (queries.shape[2] // heads) % native.ATTENTION_HEAD_MULTIPLE == 0
            and native_attention_available())


def attention_fits(queries: torch.Tensor, keys_values: torch.Tensor, heads: int) -> bool:
    """Whether `native.attention` computes these heads here: bf16 CPU inference (no gradient
    recorded), N x L x C queries and N x S x 2C keys and values, heads of a whole number of
    16-channel vectors, the native kernels built with bf16 pair products."""
    return _heads_fit(queries, keys_values, heads) and not records_gradients(queries, keys_values)


def training_attention_fits(queries: torch.Tensor, keys_values: torch.Tensor, heads: int) -> bool:
    """Whether `native_training_attention` computes these heads: as `attention_fits`, but with
    gradients recorded, and a softmax to keep within `MAX_KEPT_PROBABILITIES`."""
    n, length = queries.shape[:2]
    return (_heads_fit(queries, keys_values, heads) and records_gradients(queries, keys_values)
            and n * heads * length * keys_values.shape[1] <= MAX_KEPT_PROBABILITIES)


class _TrainingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, queries: torch.Tensor, keys_values: torch.Tensor,
                heads: int) -> torch.Tensor:
        n, length, _ = queries.shape
        probabilities = queries.new_empty(n, heads, length, keys_values.shape[1])
        out = native.attention(queries, keys_values, heads, probabilities=probabilities)
        ctx.save_for_backward(queries, keys_values, probabilities)
        ctx.heads = heads
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        queries, keys_values, probabilities = ctx.saved_tensors
        grad_queries, grad_keys_values = native.attention_grads(grad_out.contiguous(), queries, keys_values,
                                                                probabilities, ctx.heads,
                                                                keys_values_grad=ctx.needs_input_grad[1])
        return grad_queries if ctx.needs_input_grad[0] else None, grad_keys_values, None


def native_training_attention(queries: torch.Tensor, keys_values: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention with gradients, where `training_attention_fits`: forward by
    `native.attention` (keeping its softmax), backward by `native.attention_grads` (module docstring).
    Returns N x L x C tokens like `native.attention`'s."""
    return _TrainingAttention.apply(queries.contiguous(), keys_values.contiguous(), heads)
