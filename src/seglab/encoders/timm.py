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

__all__ = ["TimmEncoder"]


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
        # The first `depth` stages (all of them when the model has fewer, e.g. ConvNeXt's 4);
        # timm drops the modules after the last stage returned.
        try:
            try:
                self.model = timm.create_model(name, out_indices=tuple(range(depth)), **options)
            except IndexError:
                self.model = timm.create_model(name, **options)
        except (TypeError, AssertionError, IndexError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"timm cannot build encoder {name!r} with depth={depth}, output_stride={output_stride}: {error}"
            ) from error
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.strides: list[int] = list(self.model.feature_info.reduction())
        if weights is not None and not pretrained:
            first_conv = self.model.pretrained_cfg.get("first_conv")
            if isinstance(first_conv, (list, tuple)):
                first_conv = first_conv[0]
            load_weights_file(self.model, weights, first_conv=f"{first_conv}.weight" if first_conv else None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


def _timm_pretrained(weights: str | None) -> tuple[bool, str | None]:
    if weights is None:
        return False, None
    if weights == "timm":
        return True, None
    if weights.startswith("timm:"):
        return True, weights.split(":", 1)[1]
    if not looks_like_path(weights):
        raise ValueError(
            f"encoder weights {weights!r} are neither a file path nor 'timm' / 'timm:<tag>' (timm's pretrained weights)"
        )
    return False, None
