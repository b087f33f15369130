"""Tiny configurations of every semantic architecture, shared by the tests in this folder.

Each keeps the architecture's structure (every box of the paper's figure) but shrinks widths
or picks a tiny encoder (timm's `test_resnet`, 0.4M parameters, and `test_efficientnet`), so
a forward/backward pass on a 32-48 px image takes a fraction of a second on a CPU.
"""
from __future__ import annotations

import pytest
import torch

import seglab

TINY = {
    "fcn32s": dict(width=0.125),
    "fcn16s": dict(width=0.125),
    "fcn8s": dict(width=0.125),
    "fcn8s_resnet": dict(model="fcn8s", encoder="test_resnet"),
    "segnet": dict(width=0.125),
    "deconvnet": dict(width=0.125),
    "unet": dict(base_channels=8, depth=4),
    "unet_valid": dict(model="unet", base_channels=4, depth=3, padding="valid"),
    "unet_resnet": dict(model="unet", encoder="test_resnet"),
    "unet_mit": dict(model="unet", encoder="mit_b0", decoder_channels=[32, 16, 16, 8, 8]),
    "fpn": dict(encoder="test_efficientnet", pyramid_channels=32, head_channels=16),
    "pspnet": dict(encoder="test_resnet"),
    "deeplabv2": dict(encoder="test_resnet"),
    "deeplabv3": dict(encoder="test_efficientnet", output_stride=8),
    "deeplabv3plus": dict(encoder="test_resnet"),
    "hrnet": dict(encoder="hrnet_w18_small"),
    "segformer": dict(variant="b0", drop_path_rate=0.0),  # stochastic depth would zero some gradients
    "hourglass": dict(channels=16, order=2, stacks=2),
}


def build_tiny(key: str, num_classes: int = 3, **extra) -> torch.nn.Module:
    kwargs = dict(TINY[key])
    name = kwargs.pop("model", key)
    torch.manual_seed(0)
    return seglab.create_model(name, num_classes=num_classes, **kwargs, **extra)


def main_output(output):
    return output["out"] if isinstance(output, dict) else output


@pytest.fixture
def tiny_model():
    return build_tiny
