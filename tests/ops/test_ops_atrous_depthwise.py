"""The dilated depthwise convolution as shifted windows, against F.conv2d: values, gradients,
dtypes, and when the module takes that route."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradient_checks import assert_values_and_gradients_equal

from seglab.ops.atrous_depthwise import AtrousDepthwiseConv2d, shifted_depthwise_conv


@pytest.mark.parametrize("dilation", [1, 2, 6, 30])  # 30: every tap but the centre outside the map
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_convolution(dilation, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 13, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(5, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    ours = shifted_depthwise_conv(x, weight, b, (dilation, dilation))
    expected = F.conv2d(x, weight, b, padding=dilation, dilation=dilation, groups=5)
    assert_values_and_gradients_equal(ours, expected, [x, weight] + ([b] if bias else []))


def test_five_by_five_kernel_and_unequal_dilations():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 11, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    expected = F.conv2d(x, weight, padding=(4, 6), dilation=(2, 3), groups=3)
    torch.testing.assert_close(shifted_depthwise_conv(x, weight, None, (2, 3)), expected, rtol=0, atol=1e-12)


def test_bf16_under_autocast_sums_in_float32_and_returns_bf16():
    torch.manual_seed(0)
    conv = AtrousDepthwiseConv2d(16, 3, dilation=12)
    x = torch.randn(2, 16, 20, 20).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    exact = F.conv2d(x.detach().double(), conv.weight.detach().double(), padding=12, dilation=12, groups=16)
    torch.testing.assert_close(out.double(), exact, atol=0.02, rtol=0.01)  # one bf16 rounding of the result
    out.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_module_is_a_conv2d_with_the_same_state_dict_and_picks_its_route():
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 8, 3, padding=12, dilation=12, groups=8, bias=False)
    ours = AtrousDepthwiseConv2d(8, 3, dilation=12)
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, 16, 16)
    for layout in (torch.contiguous_format, torch.channels_last):  # NCHW: the plain convolution
        torch.testing.assert_close(ours(x.contiguous(memory_format=layout)), plain(x), atol=1e-5, rtol=1e-5)
    # Traced code records the plain convolution (no loop over sizes frozen into the trace).
    traced = torch.jit.trace(ours.eval(), x.contiguous(memory_format=torch.channels_last))
    assert "conv" in str(traced.inlined_graph) and "addcmul" not in str(traced.inlined_graph)
    with pytest.raises(ValueError, match="odd kernel"):
        AtrousDepthwiseConv2d(8, 4, dilation=2)
