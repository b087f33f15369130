"""Mix Transformer encoders MiT-B0..B5 (Xie et al., NeurIPS 2021 "SegFormer", Sec. 3.1).

Four stages at strides 4, 8, 16, 32. Each starts with an overlapping patch embedding (a strided
convolution: 7x7 stride 4 first, 3x3 stride 2 after) and stacks transformer blocks made of
- efficient self-attention: keys and values come from the sequence shrunk by a factor R^2 with
  a RxR stride-R convolution (R = 8, 4, 2, 1), cutting the cost from O(N^2) to O(N^2 / R^2);
- Mix-FFN: Linear, 3x3 depthwise conv, GELU, Linear. The depthwise conv leaks enough
  position information that no positional encoding is needed, so any input size works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.ops import native
from seglab.ops.depthwise_gelu import depthwise_gelu_fits, native_depthwise_gelu
from seglab.ops.kept import KeptFromWeights
from seglab.ops.mix_ffn import NativeWeights, mix_ffn_fits, native_mix_ffn
from seglab.ops.token_attention import attention_fits, native_training_attention, training_attention_fits
from seglab.ops.token_linear import token_linear

__all__ = ["MixTransformer", "MIT_CONFIGS"]


@dataclass(frozen=True)
class MiTConfig:
    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    reductions: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


# Table 6 of the paper (encoder hyper-parameters per size).
MIT_CONFIGS = {
    "mit_b0": MiTConfig((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": MiTConfig((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": MiTConfig((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": MiTConfig((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": MiTConfig((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": MiTConfig((64, 128, 320, 512), (3, 6, 40, 3)),
}


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens (N, H*W, C) as a channels_last map (N, C, H, W), without a copy.

    Split H*W first, then permute: that keeps the canonical batch stride C*H*W even for N = 1.
    Transposing first gives stride C there; torch then takes the map for NCHW, and convolutions
    (the Mix-FFN's depthwise one ran 5x slower at 128 x 128), bilinear upsampling and the ops
    after them fall back to NCHW kernels and layout copies."""
    return tokens.reshape(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride, padding=patch // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, reduction: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reduction = reduction
        if reduction > 1:
            self.sr = nn.Conv2d(dim, dim, reduction, reduction)
            self.norm = nn.LayerNorm(dim)
        # The query and output projections (with the residual) by native products where they fit,
        # set by the fast path (`seglab.engine.fastpath.use_native_segformer`): CPU inference.
        self.native = False
        # The heads' attention by the native kernel where it fits, bf16 on the CPU: in inference
        # set by the fast path (`seglab.engine.fastpath.use_native_segformer_bf16`), in training
        # by the trainer's context (`seglab.engine.attention`), which adds a backward pass.
        self.native_attention = False
        self._q_weight: KeptFromWeights[torch.Tensor] = KeptFromWeights()
        self._proj_weight: KeptFromWeights[torch.Tensor] = KeptFromWeights()

    def forward(self, x: torch.Tensor, height: int, width: int, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over tokens x (N, H*W, C), plus `residual` if given."""
        n, length, dim = x.shape
        queries = token_linear(self.q, x, self._q_weight, natively=self.native)
        context = x
        if self.reduction > 1:
            context = self.norm(self.sr(tokens_to_map(x, height, width)).flatten(2).transpose(1, 2))
        keys_values = self.kv(context)
        if self.native_attention and attention_fits(queries, keys_values, self.heads):
            out = native.attention(queries.contiguous(), keys_values.contiguous(), self.heads)
        elif self.native_attention and training_attention_fits(queries, keys_values, self.heads):
            out = native_training_attention(queries, keys_values, self.heads)
        else:
            q = queries.reshape(n, length, self.heads, dim // self.heads).transpose(1, 2)
            k, v = keys_values.reshape(n, -1, 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, dim)
        return token_linear(self.proj, out, self._proj_weight, natively=self.native, residual=residual)


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        # The four operators (with the LayerNorm before them and the residual addition after them,
        # where the block hands them over) in one native pass where they fit, set by the fast path
        # (`seglab.engine.fastpath.use_native_segformer`, and `use_native_segformer_bf16` in bf16):
        # CPU inference.
        self.native = False
        self._native_weights: KeptFromWeights[NativeWeights] = KeptFromWeights()
        # The depthwise convolution and GELU by one native kernel forward and one backward, set in
        # CPU training by `seglab.engine.mix_ffn.TrainingMixFFN`.
        self.native_training = False

    def forward(self, x: torch.Tensor, height: int, width: int, residual: torch.Tensor | None = None,
                norm: nn.Module | None = None) -> torch.Tensor:
        """The block's output for tokens x (N, H*W, C), normalised by `norm` first and plus
        `residual` after, where given."""
        if self.native and mix_ffn_fits(x, self.fc1, self.dwconv, self.act, self.fc2, norm, residual):
            return native_mix_ffn(x, height, width, self.fc1, self.dwconv, self.fc2, self._native_weights, residual,
                                  norm)
        if norm is not None:
            x = norm(x)
        x = self.fc1(x)
        if self.native_training and depthwise_gelu_fits(x, self.dwconv, self.act):
            x = native_depthwise_gelu(x, height, width, self.dwconv)
        else:
            # GELU on the map, straight after the depthwise conv: the fast path runs the two as one
            # oneDNN kernel (the same function: GELU is element-wise).
            x = self.act(self.dwconv(tokens_to_map(x, height, width))).flatten(2).transpose(1, 2)
        x = self.fc2(x)
        return x if residual is None else residual + x


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability `p`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, reduction: int, mlp_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientSelfAttention(dim, heads, reduction)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self.drop_path.p == 0.0 or not self.training:  # the shortcuts (and norm2) inside the branches' passes
            x = self.attn(self.norm1(x), height, width, residual=x)
            return self.ffn(x, height, width, residual=x, norm=self.norm2)
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.ffn(self.norm2(x), height, width))


class MiTStage(nn.Module):
    def __init__(self, in_channels: int, dim: int, first: bool, depth: int, heads: int, reduction: int,
                 mlp_ratio: int, drop_paths: list[float]) -> None:
        super().__init__()
        self.embed = OverlapPatchEmbed(in_channels, dim, patch=7 if first else 3, stride=4 if first else 2)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, reduction, mlp_ratio, drop_paths[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, height, width = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens, height, width)
        return tokens_to_map(self.norm(tokens), height, width)


class MixTransformer(nn.Module):
    """MiT encoder; `forward` returns the four stage maps (strides 4, 8, 16, 32)."""

    def __init__(self, variant: str = "mit_b0", in_channels: int = 3, depth: int = 4, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if variant not in MIT_CONFIGS:
            raise ValueError(f"unknown Mix Transformer {variant!r}; choose one of {', '.join(MIT_CONFIGS)}")
        if not 1 <= depth <= 4:
            raise ValueError(f"MiT has 4 stages; depth must be 1..4, not {depth}")
        cfg = MIT_CONFIGS[variant]
        # Stochastic depth grows linearly with the block index over the whole network.
        blocks = sum(cfg.depths)
        rates = [drop_path_rate * i / max(blocks - 1, 1) for i in range(blocks)]
        self.stages = nn.ModuleList()
        previous, start = in_channels, 0
        for i in range(depth):
            self.stages.append(
                MiTStage(previous, cfg.widths[i], i == 0, cfg.depths[i], cfg.heads[i], cfg.reductions[i],
                         cfg.mlp_ratio, rates[start : start + cfg.depths[i]])
            )
            previous, start = cfg.widths[i], start + cfg.depths[i]
        self.channels: list[int] = list(cfg.widths[:depth])
        self.strides: list[int] = [4, 8, 16, 32][:depth]
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _init_weights(module: nn.Module) -> None:
    # The paper's initialisation: truncated normal (std 0.02) for linear layers, fan-out normal for convs.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        nn.init.zeros_(module.bias)
