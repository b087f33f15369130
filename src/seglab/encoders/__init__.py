"""Backbones: image -> list of feature maps, one per stage, with `.channels` and `.strides`.

`create_encoder` dispatches on the name: ``vgg16`` / ``vgg16_bn`` (own VGG16 with pooling
indices and fc6/fc7 as convolutions), ``mit_b0`` .. ``mit_b5`` (own Mix Transformer), anything
else is a timm model name.
"""
from __future__ import annotations

import types
from typing import Any, Mapping

import torch.nn as nn

from seglab.encoders.mit import MIT_CONFIGS, MixTransformer
from seglab.encoders.timm import TimmEncoder, has_self_attention
from seglab.encoders.vgg import VGG16Encoder
from seglab.encoders.weights import load_weights_file, looks_like_path, read_state_dict

__all__ = ["create_encoder", "encoder_recipe", "MixTransformer", "TimmEncoder", "VGG16Encoder", "read_state_dict"]

# What training with a transformer encoder needs where neither the user nor the model says:
# a linear learning-rate warm-up, as SegFormer's, Swin's and ViT's own recipes (docs/bench.md,
# thirty-second session: FPN on mit_b0 stalled without it on the synthetic recipe; thirty-eighth:
# FPN on timm's pvt_v2_b0 likewise)
_TRANSFORMER_RECIPE: Mapping[str, Any] = types.MappingProxyType({"warmup_epochs": 1.0})


def encoder_recipe(name: str | None) -> Mapping[str, Any]:
    """Training options (TrainConfig fields) the encoder `name` needs where the user and the
    model's own recipe give none: a warm-up for the Mix Transformers and for timm's models with
    self-attention (`seglab.encoders.timm.has_self_attention`), nothing for the others."""
    if name is None:
        return {}
    return _TRANSFORMER_RECIPE if name in MIT_CONFIGS or has_self_attention(name) else {}


def create_encoder(
    name: str,
    *,
    in_channels: int = 3,
    output_stride: int = 32,
    weights: str | None = None,
    depth: int = 5,
) -> nn.Module:
    """Build the encoder `name`. `output_stride` (8, 16, 32) trades the last strides for
    dilation; `weights` is a local safetensors / state-dict file or, for timm encoders,
    ``"timm"`` / ``"timm:<tag>"`` to let timm fetch its pretrained weights; `depth` is the number
    of stages returned (capped at what the encoder has)."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, not {output_stride}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, not {in_channels}")
    own: nn.Module | None = None
    if name in ("vgg16", "vgg16_bn"):
        own = VGG16Encoder(in_channels, batch_norm=name == "vgg16_bn", depth=depth)
        first_conv = "stages.0.0.0.weight"
    elif name in MIT_CONFIGS:
        own = MixTransformer(name, in_channels, depth=min(depth, 4))
        first_conv = "stages.0.embed.proj.weight"
    if own is None:
        return TimmEncoder(name, in_channels, output_stride, weights, depth)
    if output_stride != 32:
        raise ValueError(f"encoder {name!r} supports only output_stride=32, not {output_stride}")
    if weights is not None:
        if not looks_like_path(weights):
            raise ValueError(f"encoder {name!r} takes a weights file path, not {weights!r}")
        load_weights_file(own, weights, first_conv=first_conv)
    return own
