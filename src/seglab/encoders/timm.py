"""Any timm model as an encoder, through timm's `features_only` contract.

`output_stride` 8 or 16 makes timm replace the striding of the last stages by dilation (the
atrous backbone of DeepLab and PSPNet); `in_channels` is passed to timm, which builds the first
convolution for it. `weights` is None (random), a local file, or ``"timm"`` / ``"timm:<tag>"``
for timm's own pretrained weights (downloaded by timm; only when explicitly asked).
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn

from seglab.encoders.weights import load_weights_file, looks_like_path

__all__ = ["TimmEncoder", "has_self_attention"]


class TimmEncoder(nn.Module):
    def __init__(
        self,
        name: str,
        in_channels: int = 3,
        output_stride: int = 32,
        weights: str | None = None,
        depth: int = 5,
        **timm_options,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(f"unknown encoder {name!r}: not a timm model name, nor vgg16/vgg16_bn/mit_b0..mit_b5")
        pretrained, tag = _timm_pretrained(weights)
        options: dict = {"features_only": True, "in_chans": in_channels, "pretrained": pretrained, **timm_options}
        if output_stride != 32:
            options["output_stride"] = output_stride
        if tag:
            options["pretrained_cfg_overlay"] = {"tag": tag}
        try:
            self.model = _create_any_size(name, depth, options)
        except (TypeError, AssertionError, IndexError, ValueError, RuntimeError) as error:
            if isinstance(error, TypeError) and output_stride != 32 and "output_stride" in str(error):
                raise ValueError(
                    f"encoder {name!r} cannot trade its last strides for dilation (output_stride={output_stride}); "
                    "give the model output_stride=32 (--model-option output_stride=32) or take a convolutional encoder"
                ) from error
            raise ValueError(
                f"timm cannot build encoder {name!r} with depth={depth}, output_stride={output_stride}: {error}"
            ) from error
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.strides: list[int] = list(self.model.feature_info.reduction())
        # Swin and some other transformers hand their maps over as N x H x W x C; seglab's
        # decoders read N x C x H x W, which the permuted view is (channels-last in memory).
        self.channels_last_maps = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        if weights is not None and not pretrained:
            first_conv = self.model.pretrained_cfg.get("first_conv")
            if isinstance(first_conv, (list, tuple)):
                first_conv = first_conv[0]
            load_weights_file(self.model, weights, first_conv=f"{first_conv}.weight" if first_conv else None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = list(self.model(x))
        if self.channels_last_maps:
            return [m.permute(0, 3, 1, 2) for m in maps]
        return maps


# Convolution networks' channel and branch gates that timm names like attention; they weigh
# channels or kernels, not positions, so they do not make a network a transformer.
_GATES = frozenset({"SplitAttn", "SelectiveKernelAttn"})


def has_self_attention(name: str) -> bool:
    """Whether the timm model `name` attends between positions (ViT, DeiT, Swin, PVT, Twins,
    MaxViT, CoAtNet, BoTNet, ...): one of its modules is an attention layer by timm's naming
    (``*Attention*``, ``*Attn*``), the convolution networks' gates aside. The model is built on
    the meta device, so nothing is allocated (0.01-0.4 s); an unknown or unbuildable name is not
    a transformer here (the encoder's own construction names the problem)."""
    if not timm.is_model(name):
        return False
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except (TypeError, AssertionError, IndexError, ValueError, RuntimeError):
        return False
    kinds = {type(module).__name__ for module in model.modules()} - _GATES
    return any("Attention" in kind or "Attn" in kind for kind in kinds)


def _create_any_size(name: str, depth: int, options: dict) -> nn.Module:
    """timm's features-only model for `name`, taking images of any size where the model can:
    transformers built for one image size (ViT, Swin) take `dynamic_img_size`, which
    interpolates their position embeddings and pads their windows, so that a segmentation
    encoder trained on 64 x 64 crops also reads a whole 1024 x 768 image. Models without the
    option (convolution networks take any size anyway) are built without it."""
    if "dynamic_img_size" not in options:
        try:
            return _create(name, depth, {**options, "dynamic_img_size": True})
        except TypeError as error:
            if "dynamic_img_size" not in str(error):
                raise
    return _create(name, depth, options)


def _create(name: str, depth: int, options: dict) -> nn.Module:
    # The first `depth` stages (all of them when the model has fewer, e.g. ConvNeXt's 4);
    # timm drops the modules after the last stage returned.
    try:
        return timm.create_model(name, out_indices=tuple(range(depth)), **options)
    except IndexError:
        return timm.create_model(name, **options)


def _timm_pretrained(weights: str | None) -> tuple[bool, str | None]:
    if weights is None:
        return False, None
    if weights == "timm":
        return True, None
    if weights.startswith("timm:"):
        return True, weights.split(":", 1)[1]
    if not looks_like_path(weights):
        # smp's users write "imagenet"; here timm's own default tag is the model's pretrained set
        # (ImageNet for the ResNets), named by "timm" rather than guessed from a data set name.
        hint = ("; for timm's pretrained weights (ImageNet for the ResNets; downloaded, so online) give 'timm'"
                if weights.lower() in ("imagenet", "pretrained", "true") else "")
        raise ValueError(
            f"encoder weights {weights!r} are neither a file path nor 'timm' / 'timm:<tag>' (timm's pretrained weights){hint}"
        )
    return False, None
