"""The training route of SegFormer's Mix-FFN on the CPU: each `MixFFN`'s depthwise convolution
and GELU by one native kernel forward and one backward
(`seglab.ops.depthwise_gelu.native_depthwise_gelu`), where PyTorch ran four passes.

`TrainingMixFFN(model)` is a context, like `TrainingAttention`: inside it the model's Mix-FFN
modules take the route wherever a call fits (`depthwise_gelu_fits`); every call outside it,
evaluation in the trainer included, runs PyTorch's operators. `training_mix_ffn` builds it for
bf16 autocast training on the CPU.
"""
from __future__ import annotations

from typing import ContextManager

import torch
import torch.nn as nn

from seglab.encoders.mit import MixFFN
from seglab.engine.switch import ModuleSwitch, in_cpu_bf16_training
from seglab.ops import native

__all__ = ["TrainingMixFFN", "training_mix_ffn"]


class TrainingMixFFN(ModuleSwitch):
    """A context in which `model`'s Mix-FFN modules take the native route above."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__([m for m in model.modules() if isinstance(m, MixFFN)], "native_training")


def training_mix_ffn(model: nn.Module, device: torch.device | str, precision: str | int,
                     enabled: bool = True) -> ContextManager:
    """`TrainingMixFFN(model)` for bf16 autocast training on the CPU where the native kernels are
    built and the model has Mix-FFN blocks (build it once, enter it at each step); elsewhere a
    context that changes nothing."""
    return in_cpu_bf16_training(TrainingMixFFN, model, MixFFN, device, precision, enabled, native.available)
