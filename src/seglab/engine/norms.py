"""The training route of a model's BatchNorms on the CPU: each with what follows it (a ReLU, or
a ResNet block's shortcut addition and ReLU) in one native kernel, `seglab.ops.batch_norm`.

`TrainingNorms(model)` is a context, like `TrainingConvolutions`: inside it
- a plain `nn.BatchNorm2d` whose output goes straight into a ReLU takes that ReLU along (the
  ReLU module passing its input through meanwhile). That is known where the model's code says
  so: consecutive children of an `nn.Sequential` that keeps Sequential's forward (seglab's
  `ConvNormAct`, U-Net's boxes, ...) or of timm's `FeatureListNet` (an encoder's stem), and
  timm's ResNet blocks (bn1 -> act1; a Bottleneck's bn2 -> act2);
- timm's ResNet blocks (BasicBlock, Bottleneck) without squeeze-excitation or drop path end in
  one call: the last norm, the shortcut addition and the ReLU;
- any other plain BatchNorm2d runs by the kernel alone;
- in a stage made of such blocks (an `nn.Sequential` that keeps Sequential's forward), each
  block's output goes to the next block twice, to its first convolution and to its shortcut
  (`batch_norm_act_twice`), so that the norm's backward adds the two gradients in its own first
  pass instead of autograd adding them in a pass of its own: the same bits, 12 of the 17
  additions of FCN-R50's bf16 step gone (add.Tensor 20-32 -> 6 ms; the step 1.017x, 24
  interleaved rounds).
Only modules registered once in the model are rerouted (one registered twice might also run
elsewhere, after something else). The modules' `forward` is replaced per instance and restored
on exit; parameters, buffers and names stay as they were. Calls that do not qualify
(evaluation, other devices, NCHW maps, a tracer: `takes_native_batch_norm`) run the modules'
own computation, so the model computes the same either way.

Measured on a 2-core Zen 4, bf16 autocast, batch 4 at 512 x 512, alternating steps in one
process: FCN-R50's training step 1.045x faster, UNet-R34's 1.023x (docs/bench.md). Only bf16
maps take the route (`seglab.ops.batch_norm`), so `training_norms` builds it for bf16 only. The
trainer takes it by default in bf16 on the CPU (`--no-native-norms` for PyTorch's): on the
default synthetic recipe, ten seeds with a rule fixed before the runs (twenty-ninth session,
docs/bench.md) ended within the tolerance of the same runs with PyTorch's norms.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, ContextManager

import torch
import torch.nn as nn
from timm.models._features import FeatureListNet
from timm.models.resnet import BasicBlock, Bottleneck

from seglab.engine.precision import resolve_precision
from seglab.ops import native
from seglab.ops.batch_norm import batch_norm_act, batch_norm_act_twice, takes_native_batch_norm

__all__ = ["TrainingNorms", "norm_relu_pairs", "training_norms"]

# timm block -> its (norm, ReLU) attribute pairs where the ReLU takes the norm's output as it is
# (given an identity drop_block), and its last norm and ReLU, around the shortcut addition.
_BLOCK_PAIRS = {BasicBlock: (("bn1", "act1"),), Bottleneck: (("bn1", "act1"), ("bn2", "act2"))}
_BLOCK_ENDS = {BasicBlock: ("bn2", "act2"), Bottleneck: ("bn3", "act3")}


def _plain_norm(module: nn.Module | None) -> bool:
    return type(module) is nn.BatchNorm2d


def _relu(module: nn.Module | None) -> bool:
    return type(module) is nn.ReLU


def _passes_through(module: nn.Module | None) -> bool:
    return module is None or type(module) is nn.Identity


def _runs_children_in_order(module: nn.Module) -> bool:
    return type(module) is FeatureListNet or (isinstance(module, nn.Sequential)
                                              and type(module).forward is nn.Sequential.forward)


def _registered_once(model: nn.Module) -> set[int]:
    counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    return {key for key, count in counts.items() if count == 1}


def norm_relu_pairs(model: nn.Module, once: set[int] | None = None) -> list[tuple[nn.BatchNorm2d, nn.ReLU]]:
    """The (BatchNorm2d, ReLU) pairs of `model` in which the ReLU gets the norm's output as it is
    (`once`: the ids of the modules registered once, when the caller has them already)."""
    pairs = []
    for parent in model.modules():
        if _runs_children_in_order(parent):
            children = list(parent.children())
            pairs += [(a, b) for a, b in zip(children, children[1:]) if _plain_norm(a) and _relu(b)]
        for names in _BLOCK_PAIRS.get(type(parent), ()):
            norm, act = (getattr(parent, name, None) for name in names)
            if _plain_norm(norm) and _relu(act) and _passes_through(getattr(parent, "drop_block", None)):
                pairs.append((norm, act))
    once = _registered_once(model) if once is None else once
    return [(norm, relu) for norm, relu in pairs if id(norm) in once and id(relu) in once]


def _fusable_block(block: nn.Module) -> bool:
    """A timm ResNet block whose last norm feeds the shortcut addition and then its ReLU."""
    ends = _BLOCK_ENDS.get(type(block))
    return (ends is not None and _plain_norm(getattr(block, ends[0])) and _relu(getattr(block, ends[1]))
            and getattr(block, "se", None) is None and getattr(block, "drop_path", None) is None)


# A block's output, and (for the next block's shortcut) a second tensor of the same values
# whose gradient reaches the norm's backward apart, or None.
BlockOutput = tuple[torch.Tensor, torch.Tensor | None]


def _norm_add_relu(x: torch.Tensor, norm: nn.BatchNorm2d, shortcut: torch.Tensor, act: nn.Module,
                   twice: bool) -> BlockOutput:
    if takes_native_batch_norm(x, norm, shortcut):
        if twice:
            return batch_norm_act_twice(x, norm, shortcut=shortcut)
        return batch_norm_act(x, norm, relu=True, shortcut=shortcut), None
    return act(norm(x) + shortcut), None


def _shortcut(block: nn.Module, x: torch.Tensor, x_again: torch.Tensor | None) -> torch.Tensor:
    """The block's shortcut: the downsampling of x, or x itself, read through `x_again` (the
    previous block's second output) where there is one."""
    if block.downsample is not None:
        return block.downsample(x)
    return x if x_again is None else x_again


def _basic_block_forward(block: BasicBlock, x: torch.Tensor, x_again: torch.Tensor | None = None,
                         twice: bool = False) -> BlockOutput:
    """timm's BasicBlock.forward (without se and drop_path), ending in one call."""
    shortcut = _shortcut(block, x, x_again)
    x = block.aa(block.act1(block.drop_block(block.bn1(block.conv1(x)))))
    return _norm_add_relu(block.conv2(x), block.bn2, shortcut, block.act2, twice)


def _bottleneck_forward(block: Bottleneck, x: torch.Tensor, x_again: torch.Tensor | None = None,
                        twice: bool = False) -> BlockOutput:
    """timm's Bottleneck.forward (without se and drop_path), ending in one call."""
    shortcut = _shortcut(block, x, x_again)
    x = block.act1(block.bn1(block.conv1(x)))
    x = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(x)))))
    return _norm_add_relu(block.conv3(x), block.bn3, shortcut, block.act3, twice)


def _block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A fusable block called on its own: its output alone."""
    return _BLOCK_FORWARDS[type(block)](block, x)[0]


def _stage_forward(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A stage of fusable blocks: each block's output handed on twice, to the next block's first
    convolution and to its shortcut, so that the norm's backward adds their two gradients in its
    own pass (`batch_norm_act_twice`); the stage's last output once."""
    x_again = None
    blocks = list(stage)
    for index, block in enumerate(blocks):
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        twice = following is not None and following.downsample is None
        x, x_again = _BLOCK_FORWARDS[type(block)](block, x, x_again, twice)
    return x


_BLOCK_FORWARDS = {BasicBlock: _basic_block_forward, Bottleneck: _bottleneck_forward}


class TrainingNorms:
    """A context in which `model`'s BatchNorm2d modules (with the ReLU after them, or a block's
    shortcut addition and ReLU) take the native route above."""

    def __init__(self, model: nn.Module) -> None:
        once = _registered_once(model)
        self.blocks = [m for m in model.modules() if _fusable_block(m) and id(m) in once]
        fusable = {id(block) for block in self.blocks}
        # Stages (nn.Sequential, Sequential's forward) made of such blocks alone.
        self.stages = [m for m in model.modules() if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
                       and id(m) in once and len(m) > 1 and all(id(child) in fusable for child in m)]
        pairs = norm_relu_pairs(model, once)
        self.relus = [relu for _, relu in pairs]
        followed = {id(norm): relu for norm, relu in pairs}
        self.norms = [(m, followed.get(id(m))) for m in model.modules() if _plain_norm(m) and id(m) in once]

    def __enter__(self) -> TrainingNorms:
        for norm, relu in self.norms:
            norm.forward = functools.partial(self._norm_forward, norm, relu)
        for relu in self.relus:
            relu.forward = _unchanged
        for block in self.blocks:
            block.forward = functools.partial(_block_forward, block)
        for stage in self.stages:
            stage.forward = functools.partial(_stage_forward, stage)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for module in [norm for norm, _ in self.norms] + self.relus + self.blocks + self.stages:
            del module.forward  # the class's own again

    @staticmethod
    def _norm_forward(norm: nn.BatchNorm2d, relu: nn.ReLU | None, x: torch.Tensor) -> torch.Tensor:
        if takes_native_batch_norm(x, norm):
            return batch_norm_act(x, norm, relu=relu is not None)
        y = nn.BatchNorm2d.forward(norm, x)
        return y if relu is None else torch.relu_(y) if relu.inplace else torch.relu(y)


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def training_norms(model: nn.Module, device: torch.device | str, precision: str | int,
                   enabled: bool = True) -> ContextManager:
    """`TrainingNorms(model)` for bf16 autocast training on the CPU where the native kernels
    are built (build it once, enter it at each step); elsewhere a context that changes nothing
    (float32 maps stay on PyTorch's operators, `seglab.ops.batch_norm`)."""
    device = torch.device(device)
    if enabled and device.type == "cpu" and resolve_precision(precision, device).name == "bf16" and native.available():
        return TrainingNorms(model)
    return contextlib.nullcontext()
