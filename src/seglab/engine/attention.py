"""The training route of SegFormer's attention heads on the CPU: bf16 autocast training runs
each `EfficientSelfAttention`'s heads by the native kernel forward, which keeps its softmax,
and batched products backward (`seglab.ops.token_attention.native_training_attention`),
where PyTorch's flash attention ran otherwise.

`TrainingAttention(model)` is a context, like `TrainingNorms`: inside it the model's attention
modules take the route wherever a call fits (`training_attention_fits`: bf16 CPU tensors with
gradients, a processor with AVX-512 BF16's pair products, a softmax within
`MAX_KEPT_PROBABILITIES`); other calls, and every call outside the context, run PyTorch's
attention. Evaluation in the trainer runs outside it.
"""
from __future__ import annotations

from typing import ContextManager

import torch
import torch.nn as nn

from seglab.encoders.mit import EfficientSelfAttention
from seglab.engine.switch import ModuleSwitch, in_cpu_bf16_training
from seglab.ops.token_attention import native_attention_available

__all__ = ["TrainingAttention", "training_attention"]


class TrainingAttention(ModuleSwitch):
    """A context in which `model`'s SegFormer attention modules take the native route above."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__([m for m in model.modules() if isinstance(m, EfficientSelfAttention)], "native_attention")


def training_attention(model: nn.Module, device: torch.device | str, precision: str | int,
                       enabled: bool = True) -> ContextManager:
    """`TrainingAttention(model)` for bf16 autocast training on the CPU where the native kernels
    multiply bf16 by pairs and the model has SegFormer attention (build it once, enter it at
    each step); elsewhere a context that changes nothing."""
    return in_cpu_bf16_training(TrainingAttention, model, EfficientSelfAttention, device, precision, enabled,
                                native_attention_available)
