"""Fully Convolutional Networks (Long, Shelhamer & Darrell, CVPR 2015 "Fully Convolutional
Networks for Semantic Segmentation"), Fig. 3.

VGG16 with fc6/fc7 turned into convolutions; a 1x1 "score" layer predicts class scores at
stride 32. FCN-32s upsamples them x32 in one step. FCN-16s upsamples x2, adds the scores of
pool4 (stride 16) and upsamples x16; FCN-8s also adds pool3's scores (stride 8) before the
final x8. Every upsampling is a transposed convolution initialised to bilinear interpolation;
the intermediate x2 ones are learnt and the final one stays fixed to bilinear interpolation
(Sec. 4.3, "Dense Prediction"; `learn_final_upsampling=True` learns it too). The skip score
layers start at zero so training begins from the coarser net (Sec. 4.2). `encoder` may be any
other encoder too; it then has no fc6/fc7 and scores its deepest map directly.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.encoders import VGG16Encoder, create_encoder
from seglab.encoders.weights import load_weights_file
from seglab.models.registry import register_model
from seglab.ops.conv import PointwiseConv2d
from seglab.ops.padding import crop_to, pad_to_multiple
from seglab.ops.upsample import make_upsample

__all__ = ["FCN", "fcn32s", "fcn16s", "fcn8s"]


class FCN(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, output_stride: int, upsample: str = "transposed",
                 learn_final_upsampling: bool = False) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"FCN's output stride must be 8, 16 or 32, not {output_stride}")
        missing = [s for s in (8, 16, 32) if s >= output_stride and s not in encoder.strides]
        if missing:
            raise ValueError(f"FCN needs encoder maps at strides {missing}; this encoder has strides {encoder.strides}")
        self.encoder = encoder
        self.output_stride = output_stride
        self.level = {s: encoder.strides.index(s) for s in (8, 16, 32) if s >= output_stride}
        # VGG's fc6/fc7 stay the encoder's own modules, registered once: one name per parameter.
        has_fc = getattr(encoder, "fc", None) is not None
        top_channels = encoder.fc_channels if has_fc else encoder.channels[self.level[32]]
        self.score_fr = PointwiseConv2d(top_channels, num_classes)
        self.skip_scores = nn.ModuleDict()
        self.skip_ups = nn.ModuleDict()
        for stride in (16, 8):
            if stride >= output_stride:
                score = nn.Conv2d(encoder.channels[self.level[stride]], num_classes, 1)
                nn.init.zeros_(score.weight)
                nn.init.zeros_(score.bias)
                self.skip_scores[f"pool{stride}"] = score
                self.skip_ups[f"pool{stride}"] = make_upsample(upsample, num_classes, num_classes, 2)
        self.final_up = make_upsample(upsample, num_classes, num_classes, output_stride)
        if upsample == "transposed" and not learn_final_upsampling:
            self.final_up.requires_grad_(False)  # bilinear interpolation, as a fixed filter
            self.final_up.fixed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = pad_to_multiple(x, 32)
        features = self.encoder(x)
        top = features[self.level[32]]
        fc = getattr(self.encoder, "fc", None)
        score = self.score_fr(top if fc is None else fc(top))
        for stride in (16, 8):
            key = f"pool{stride}"
            if key in self.skip_scores:
                skip = features[self.level[stride]]
                score = self.skip_ups[key](score, size=skip.shape[-2:]) + self.skip_scores[key](skip)
        return crop_to(self.final_up(score, size=x.shape[-2:]), size)


def _build(output_stride: int, num_classes: int, in_channels: int, encoder: str, encoder_weights: str | None,
           width: float, upsample: str, learn_final_upsampling: bool) -> FCN:
    if encoder in ("vgg16", "vgg16_bn"):
        backbone: nn.Module = VGG16Encoder(in_channels, batch_norm=encoder == "vgg16_bn", with_fc=True, width=width)
        if encoder_weights is not None:
            load_weights_file(backbone, encoder_weights, first_conv="stages.0.0.0.weight")
    else:
        if width != 1.0:
            raise ValueError("width applies to the vgg16 encoders only")
        backbone = create_encoder(encoder, in_channels=in_channels, weights=encoder_weights)
    return FCN(backbone, num_classes, output_stride, upsample, learn_final_upsampling)


@register_model("fcn32s", paper="Long et al., CVPR 2015")
def fcn32s(*, num_classes: int, in_channels: int = 3, encoder: str = "vgg16", encoder_weights: str | None = None,
           width: float = 1.0, upsample: str = "transposed", learn_final_upsampling: bool = False) -> nn.Module:
    """FCN-32s: VGG16 fc-as-conv, scores at stride 32 upsampled x32."""
    return _build(32, num_classes, in_channels, encoder, encoder_weights, width, upsample, learn_final_upsampling)


@register_model("fcn16s", paper="Long et al., CVPR 2015")
def fcn16s(*, num_classes: int, in_channels: int = 3, encoder: str = "vgg16", encoder_weights: str | None = None,
           width: float = 1.0, upsample: str = "transposed", learn_final_upsampling: bool = False) -> nn.Module:
    """FCN-16s: stride-32 scores x2 plus pool4 scores, upsampled x16."""
    return _build(16, num_classes, in_channels, encoder, encoder_weights, width, upsample, learn_final_upsampling)


@register_model("fcn8s", paper="Long et al., CVPR 2015")
def fcn8s(*, num_classes: int, in_channels: int = 3, encoder: str = "vgg16", encoder_weights: str | None = None,
          width: float = 1.0, upsample: str = "transposed", learn_final_upsampling: bool = False) -> nn.Module:
    """FCN-8s: FCN-16s plus pool3 scores, upsampled x8 (the paper's best)."""
    return _build(8, num_classes, in_channels, encoder, encoder_weights, width, upsample, learn_final_upsampling)
