"""The 3x3 convolution of a nearest-upsampled map, computed at the low resolution, against the
plain computation (upsample, concatenate, convolve)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.ops.nearest_conv import NearestUpsampleConv, conv3x3_of_nearest2x, nearest2x_transposed_weight


def _plain(conv: nn.Conv2d, x: torch.Tensor, skip: torch.Tensor | None, size=None) -> torch.Tensor:
    if skip is not None:
        size = skip.shape[-2:]
    up = F.interpolate(x, size=size or (2 * x.shape[-2], 2 * x.shape[-1]), mode="nearest")
    return F.conv2d(up if skip is None else torch.cat([up, skip], 1), conv.weight, conv.bias, padding=1)


def test_transposed_kernel_adds_the_taps_that_read_the_same_source_pixel():
    weight = torch.arange(9.0).view(1, 1, 3, 3)  # rows [0 1 2] [3 4 5] [6 7 8]
    transposed = nearest2x_transposed_weight(weight)
    assert transposed.shape == (1, 1, 4, 4)
    # low row i reaches output rows 2i-1 (tap 2), 2i (taps 1 + 2), 2i+1 (taps 0 + 1), 2i+2 (tap 0);
    # columns alike: [a b c] -> [c, b + c, a + b, a]
    expected = torch.tensor([[8.0, 7 + 8, 6 + 7, 6],
                             [5 + 8, 4 + 5 + 7 + 8, 3 + 4 + 6 + 7, 3 + 6],
                             [2 + 5, 1 + 2 + 4 + 5, 0 + 1 + 3 + 4, 0 + 3],
                             [2, 1 + 2, 0 + 1, 0]])
    torch.testing.assert_close(transposed[0, 0], expected)
    assert nearest2x_transposed_weight(torch.randn(5, 3, 3, 3)).shape == (3, 5, 4, 4)  # C_in x C_out


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("skip_channels", [0, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_plain_computation(channels_last, skip_channels, bias):
    torch.manual_seed(0)
    conv = NearestUpsampleConv(7 + skip_channels, 6, bias=bias).double()
    x = torch.randn(2, 7, 5, 9, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, skip_channels, 10, 18, dtype=torch.float64, requires_grad=True) if skip_channels else None
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = conv(x.contiguous(memory_format=layout), skip)
    expected = _plain(conv, x, skip)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert out.is_contiguous(memory_format=layout)  # the layout the next convolution reads
    upstream = torch.randn_like(expected)
    inputs = [x, *conv.parameters()] + ([skip] if skip is not None else [])
    ours = torch.autograd.grad((out * upstream).sum(), inputs)
    theirs = torch.autograd.grad((expected * upstream).sum(), inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_other_sizes_fall_back_to_upsampling():
    torch.manual_seed(0)
    conv = NearestUpsampleConv(4, 3)
    x = torch.randn(1, 3, 5, 5)
    skip = torch.randn(1, 1, 11, 9)  # not twice x's size (an odd-sized input upstream)
    torch.testing.assert_close(conv(x, skip), _plain(conv, x, skip))
    lone = NearestUpsampleConv(3, 2)
    torch.testing.assert_close(lone(x, size=(11, 11)), _plain(lone, x, None, size=(11, 11)))
    torch.testing.assert_close(lone(x), _plain(lone, x, None))


def test_state_dicts_interchange_with_a_plain_convolution():
    plain = nn.Conv2d(8, 4, 3, padding=1)
    ours = NearestUpsampleConv(8, 4)
    ours.load_state_dict(plain.state_dict())
    x, skip = torch.randn(1, 5, 4, 4), torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(ours(x, skip), plain(torch.cat([F.interpolate(x, scale_factor=2), skip], 1)))
    with pytest.raises(ValueError, match="3x3 convolution with stride 1"):
        NearestUpsampleConv(8, 4, 3, stride=2)


def test_bf16_in_bf16_out():
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3).bfloat16()
    x = torch.randn(1, 3, 6, 6).bfloat16()
    out = conv3x3_of_nearest2x(x, weight)
    assert out.dtype == torch.bfloat16
    reference = F.conv2d(F.interpolate(x.double(), scale_factor=2), weight.double(), padding=1)
    # bf16 arithmetic, a few units of its 8-bit mantissa at most
    torch.testing.assert_close(out.double(), reference, rtol=0.05, atol=0.05)


def test_inference_keeps_the_derived_kernels_until_the_weight_changes():
    torch.manual_seed(0)
    conv = NearestUpsampleConv(7, 4)
    x, skip = torch.randn(1, 4, 5, 5), torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        first = conv(x, skip)
        kept = conv._kept.value
        torch.testing.assert_close(conv(x, skip), first)
        assert conv._kept.value is kept  # not rebuilt
        conv.weight.mul_(2)  # an in-place change (an optimizer step) bumps the version
        torch.testing.assert_close(conv(x, skip), _plain(conv, x, skip))
        assert conv._kept.value is not kept
    copied = copy.deepcopy(conv)
    assert copied._kept.value is None
    with torch.no_grad():
        torch.testing.assert_close(copied(x, skip), conv(x, skip))
    # with gradients the kernels come from the parameter at every call, and nothing is kept
    conv._kept.clear()
    conv(x, skip).sum().backward()
    assert conv._kept.value is None and conv.weight.grad is not None
