"""PointwiseConv2d: a 1x1 convolution that trains as a matrix product over the pixels."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradient_checks import assert_values_and_gradients_equal

from seglab.ops.conv import PointwiseConv2d


def test_values_and_gradients_equal_the_convolution():
    torch.manual_seed(0)
    conv = PointwiseConv2d(12, 5).double()
    x = torch.randn(2, 12, 7, 9, dtype=torch.float64, requires_grad=True)
    ours = conv(x)
    expected = F.conv2d(x, conv.weight, conv.bias)
    assert_values_and_gradients_equal(ours, expected, [x, conv.weight, conv.bias])
    assert list(conv.state_dict()) == list(nn.Conv2d(12, 5, 1).state_dict())
    with torch.no_grad():  # inference: the plain convolution
        assert ours.shape == conv(x).shape


def test_wide_input_trains_in_bf16_autocast():
    """4096 -> 6 channels: the shape whose oneDNN bf16 weight gradient corrupted the heap."""
    torch.manual_seed(0)
    conv = PointwiseConv2d(4096, 6)
    x = torch.randn(8, 4096, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    for _ in range(3):
        with torch.autocast("cpu", torch.bfloat16):
            y = conv(x)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and y.shape == (8, 6, 2, 2)
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        expected = F.conv2d(x, conv.weight, conv.bias)
    torch.testing.assert_close(y.float(), expected.float(), atol=0.05, rtol=0.02)
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
