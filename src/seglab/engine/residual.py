"""A ResNet block's shortcut addition and last ReLU inside its last convolution (CPU inference).

A basic block ends with conv2 -> (BatchNorm, folded away) -> + shortcut -> ReLU: after the
convolution writes its output, the addition reads it back with the shortcut and writes it
again, and the ReLU does the same once more. `FusedConv` given the shortcut as `residual` does
both as post-ops of the convolution, on values still in cache. timm's blocks add the shortcut
inline in their forward, so the rewrite swaps a block's class for a subclass whose forward
passes the shortcut to the convolution (the way `torch.nn.utils.parametrize` swaps classes):
parameters, buffers and names stay as they were. A block is rewritten only when nothing but
the folded BatchNorm sits between the last convolution and the addition.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck

from seglab.engine.onednn import FusedConv, fusable_conv, onednn_available

__all__ = ["fuse_residual_additions"]


def _shortcut(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if block.downsample is None else block.downsample(x)


class BasicBlockShortcutInConv(BasicBlock):
    """timm's BasicBlock; the shortcut and the final ReLU are post-ops of conv2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = _shortcut(self, x)
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        return self.conv2(x, shortcut)


class BottleneckShortcutInConv(Bottleneck):
    """timm's Bottleneck; the shortcut and the final ReLU are post-ops of conv3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = _shortcut(self, x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        return self.conv3(x, shortcut)


# block class -> (its rewrite, the last convolution, the norm after it, the activation after the addition)
_REWRITES = {BasicBlock: (BasicBlockShortcutInConv, "conv2", "bn2", "act2"),
             Bottleneck: (BottleneckShortcutInConv, "conv3", "bn3", "act3")}


def _rewritable(block: nn.Module, conv_name: str, norm_name: str, act_name: str) -> bool:
    # Only the folded BatchNorm (now Identity) may sit between the convolution and the addition.
    return (fusable_conv(getattr(block, conv_name)) and isinstance(getattr(block, norm_name), nn.Identity)
            and getattr(block, "se", None) is None and getattr(block, "drop_path", None) is None
            and type(getattr(block, act_name)) is nn.ReLU)


def fuse_residual_additions(model: nn.Module) -> int:
    """Rewrite, in place, every timm ResNet block (BasicBlock, Bottleneck) whose last
    convolution feeds the shortcut addition directly, so that the convolution adds the shortcut
    and applies the ReLU itself (`FusedConv` with a residual). For inference, after
    `fold_conv_bn`; outside CPU inference the blocks compute the same thing step by step.
    Returns the number of blocks rewritten."""
    if not onednn_available():
        return 0
    rewritten = 0
    for block in model.modules():
        rewrite = _REWRITES.get(type(block))
        if rewrite is None or not _rewritable(block, *rewrite[1:]):
            continue
        subclass, conv_name, _, act_name = rewrite
        setattr(block, conv_name, FusedConv(getattr(block, conv_name), getattr(block, act_name)))
        setattr(block, act_name, nn.Identity())
        block.__class__ = subclass
        rewritten += 1
    return rewritten
