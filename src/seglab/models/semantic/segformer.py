"""SegFormer (Xie et al., NeurIPS 2021 "SegFormer: Simple and Efficient Design for Semantic
Segmentation with Transformers"), Fig. 2.

A Mix Transformer encoder (`seglab.encoders.mit`, MiT-B0..B5) and the all-MLP decoder: each of
the four stage maps is projected to a common width by a linear layer (a 1x1 conv), upsampled
to stride 4 and concatenated; a linear layer fuses them (here 1x1 conv + BN + ReLU, as in the
reference implementation) and a last linear layer predicts the classes, upsampled x4.
The decoder width is 256 for B0/B1 and 768 for B2..B5; stochastic depth 0.1 (Sec. 4.1).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.encoders import create_encoder, encoder_recipe
from seglab.encoders.mit import MIT_CONFIGS, MixTransformer
from seglab.encoders.weights import load_weights_file
from seglab.models.registry import register_model
from seglab.ops import native
from seglab.ops.bilinear import add_bilinear_upsampled_
from seglab.ops.grad_mode import records_gradients
from seglab.ops.conv import ConvNormAct
from seglab.ops.padding import crop_to, pad_to_multiple
from seglab.ops.upsample import upsample_scores

__all__ = ["SegFormer", "segformer"]


class AllMLPDecoder(nn.Module):
    """Fig. 2's decoder: project each stage to `dim` (linear), upsample to stride 4, concatenate,
    fuse (linear + BN + ReLU), classify.

    Computed in an equivalent, cheaper order: projection, bilinear upsampling and the fusing
    linear layer are all linear, and bilinear weights sum to one, so
        fuse(concat_i up(P_i x_i + b_i)) = sum_i up((F_i P_i) x_i + F_i b_i)
    with F_i the fuse weights' block for stage i. Each stage's share of the fused map is one
    1x1 convolution with the composed weights at the stage's own resolution, upsampled and
    summed: the fusing layer's big convolution over the 4 x `dim` concatenation at stride 4
    (over half of B0's multiply-adds at 512x512) and the concatenation itself disappear. The
    parameters are the paper's (and smp's), so weights load either way (tests check outputs and
    gradients against the paper's order).
    """

    def __init__(self, in_channels: list[int], dim: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.fuse = ConvNormAct(len(in_channels) * dim, dim, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, 1)
        # The head from the shares to the class scores in one native pass where it fits, set by
        # the fast path (`seglab.engine.fastpath.use_native_segformer` and its bf16 twin): CPU
        # inference.
        self.native = False

    def _native_head_fits(self, features: list[torch.Tensor], relu_in_sum: bool) -> bool:
        """Whether `native.mlp_head` computes the rest of the decoder: CPU inference with the norm
        folded and the ReLU in the sum, the first stage's map channels last, a classifier with a
        bias, the fused width in whole vectors; float32, or bf16 where the processor has pair
        products (and the first stage's channels pair up)."""
        first = features[0]
        dtype_fits = first.dtype == torch.float32 or (first.dtype == torch.bfloat16 and first.shape[1] % 2 == 0
                                                      and native.bf16_pairs())
        return (self.native and relu_in_sum and not self.dropout.training and self.classifier.bias is not None
                and first.device.type == "cpu" and dtype_fits and self.classifier.weight.dtype == first.dtype
                and first.permute(0, 2, 3, 1).is_contiguous() and len(features) - 1 <= native.MAX_UPSAMPLED
                and self.classifier.in_channels % 16 == 0
                and not records_gradients(*features, *self.parameters()) and native.available())

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        fuse_conv, norm, act = self.fuse
        fuse_blocks = fuse_conv.weight.flatten(1).split(self.project[0].out_channels, dim=1)  # one block per stage
        # A constant per channel (the fuse bias; in eval mode also BatchNorm's affine map, whose
        # scale multiplies the rows of each composed weight) is added once, to the first stage's
        # share: bilinear upsampling keeps constants, so no pass over the fused map is needed.
        scale, shift = None, fuse_conv.bias
        folds_norm = isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.running_var is not None
        if folds_norm:
            scale = torch.rsqrt(norm.running_var + norm.eps) * (norm.weight if norm.weight is not None else 1.0)
            shift = (0.0 if shift is None else shift) - norm.running_mean
            shift = shift * scale + (norm.bias if norm.bias is not None else 0.0)
        shares = []
        for block, project in zip(fuse_blocks, self.project):
            # A stage's share of the fused map: projection and fuse composed, to be applied at the
            # stage's own resolution and upsampled (linear maps commute with bilinear upsampling).
            weight, bias = block @ project.weight.flatten(1), block @ project.bias
            if scale is not None:
                weight, bias = weight * scale[:, None], bias * scale
            if not shares and shift is not None:
                bias = bias + shift
            shares.append((weight, bias))
        relu_in_sum = folds_norm and isinstance(act, nn.ReLU)
        smaller = [F.conv2d(f, weight[:, :, None, None], bias) for f, (weight, bias) in zip(features[1:], shares[1:])]
        if self._native_head_fits(features, relu_in_sum):  # the first share, the sum, ReLU, classifier: one pass
            (first_weight, first_bias), classifier = shares[0], self.classifier
            scores = native.mlp_head(features[0].permute(0, 2, 3, 1), first_weight.t().contiguous(), first_bias,
                                     [p.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
                                      for p in smaller],
                                     classifier.weight.flatten(1).t().contiguous(), classifier.bias)
            return scores.permute(0, 3, 1, 2)
        fused = F.conv2d(features[0], shares[0][0][:, :, None, None], shares[0][1])
        if fused.shape[-2:] != size:  # (stage 1 is at stride 4: only a custom encoder gets here)
            fused = F.interpolate(fused, size=size, mode="bilinear", align_corners=False)
        # The shares summed in one pass, the ReLU too where the norm is folded.
        fused = add_bilinear_upsampled_(fused, smaller, relu=relu_in_sum)
        if not folds_norm:
            fused = norm(fused)
        return self.classifier(self.dropout(fused if relu_in_sum else act(fused)))


class SegFormer(nn.Module):
    """A Mix Transformer `variant` (mit_b0..mit_b5) and the all-MLP decoder; or, given `encoder`
    (any module of the `seglab.encoders` contract: a timm CNN, Swin, PVT...), the decoder on that
    encoder's maps from stride 4 on (a ResNet's stride-2 map is left out, as Fig. 2 starts at
    stride 4), with `decoder_dim` 256 unless given."""

    def __init__(self, variant: str, num_classes: int, in_channels: int = 3, decoder_dim: int | None = None,
                 drop_path_rate: float = 0.1, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder if encoder is not None else MixTransformer(variant, in_channels,
                                                                          drop_path_rate=drop_path_rate)
        decoder_dim = decoder_dim or (768 if encoder is None and variant not in ("mit_b0", "mit_b1") else 256)
        strides = list(self.encoder.strides)
        self.first_map = next((i for i, stride in enumerate(strides) if stride >= 4), len(strides) - 1)
        # Stage 1's key/value reduction is an 8x8 stride-8 conv on the stride-4 map: the input
        # must be a multiple of 32 for every stage to tile exactly (and of any encoder's largest stride).
        self.multiple = max(32, *strides)
        self.decoder = AllMLPDecoder(list(self.encoder.channels)[self.first_map:], decoder_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = pad_to_multiple(x, self.multiple)
        logits = self.decoder(self.encoder(x)[self.first_map:])
        return crop_to(upsample_scores(logits, x.shape[-2:]), size)


# A transformer trained at full AdamW learning rate from its first step can stall for epochs
# (the paper warms up over 1,500 iterations). On the synthetic recipe without warm-up, 3 of 10
# seeds ended below 0.35 mIoU (docs/bench.md, thirty-second session). Its recipe is its Mix
# Transformer's, one epoch of warm-up, which other models on that encoder get too.
@register_model("segformer", paper="Xie et al., NeurIPS 2021", recipe=encoder_recipe("mit_b0"))
def segformer(*, num_classes: int, in_channels: int = 3, variant: str = "b0", encoder: str | None = None,
              encoder_weights: str | None = None, decoder_dim: int | None = None,
              drop_path_rate: float = 0.1) -> nn.Module:
    """SegFormer-B0..B5: Mix Transformer encoder, all-MLP decoder (`variant` b0..b5 or `encoder`
    mit_b0..mit_b5); with any other `encoder` name (`seglab.encoders.create_encoder`: resnet50,
    swin_tiny_patch4_window7_224, pvt_v2_b0...) the all-MLP decoder on that encoder, its
    `encoder_weights` read as create_encoder reads them (`drop_path_rate` is MiT's only)."""
    name = encoder or f"mit_{variant.lower()}"
    if name not in MIT_CONFIGS:
        if encoder is None:
            raise ValueError(f"SegFormer takes variant b0..b5 (or an encoder name), not {variant!r}")
        backbone = create_encoder(encoder, in_channels=in_channels, weights=encoder_weights)
        return SegFormer(name, num_classes, in_channels, decoder_dim, encoder=backbone)
    model = SegFormer(name, num_classes, in_channels, decoder_dim, drop_path_rate)
    if encoder_weights is not None:
        load_weights_file(model.encoder, encoder_weights, first_conv="stages.0.embed.proj.weight")
    return model
