"""Winograd's F(4x4, 3x3) against F.conv2d: values, gradients, ragged sizes, layouts, and the
multiply-adds it saves."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gradient_checks import assert_values_and_gradients_equal

from seglab.ops.winograd import winograd_conv3x3, winograd_filters


@pytest.mark.parametrize("size", [(8, 8), (9, 14), (1, 5), (4, 3)])  # whole tiles, ragged, thinner than a tile
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_convolution(size, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 6, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    ours = winograd_conv3x3(x, winograd_filters(weight), b)
    assert ours.shape == (2, 5, *size) and ours.is_contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x, weight, b, padding=1)
    assert_values_and_gradients_equal(ours, expected, [x, weight] + ([b] if bias else []), values_atol=1e-10,
                                      gradients_atol=1e-10)


@pytest.mark.parametrize("dilation, size", [(2, (12, 16)), (2, (9, 14)), (4, (10, 7)), (3, (2, 2))])
def test_dilated_values_and_gradients_equal_the_convolution(dilation, size):
    torch.manual_seed(0)
    x = torch.randn(2, 6, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ours = winograd_conv3x3(x, winograd_filters(weight), b, dilation)
    assert ours.shape == (2, 5, *size) and ours.is_contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x, weight, b, padding=dilation, dilation=dilation)
    assert_values_and_gradients_equal(ours, expected, [x, weight, b], values_atol=1e-10, gradients_atol=1e-10)


def test_float32_error_stays_at_a_few_ulps_of_the_largest_output():
    torch.manual_seed(0)
    x = torch.randn(1, 128, 16, 16)  # NCHW input is taken as well
    weight = torch.randn(128, 128, 3, 3) / (9 * 128) ** 0.5
    expected = F.conv2d(x.double(), weight.double(), padding=1)
    ours = winograd_conv3x3(x, winograd_filters(weight))
    relative = (ours.double() - expected).abs().max() / expected.abs().max()
    assert ours.dtype == torch.float32 and relative < 3e-5


def test_four_times_fewer_multiply_adds_in_the_products():
    x, weight = torch.randn(1, 128, 32, 32), torch.randn(128, 128, 3, 3)
    filters = winograd_filters(weight)
    with FlopCounterMode(display=False) as direct:
        F.conv2d(x, weight, padding=1)
    with FlopCounterMode(display=False) as winograd:
        winograd_conv3x3(x, filters)
    # 36 products per 4 x 4 tile where the direct convolution takes 144; the transforms add a
    # cost linear in the channels, at 128 channels 15% on top of the products.
    assert direct.get_total_flops() / 4 < winograd.get_total_flops() < 1.2 * direct.get_total_flops() / 4


def test_refuses_other_kernels_and_mismatched_channels():
    with pytest.raises(ValueError, match="3x3"):
        winograd_filters(torch.randn(4, 4, 5, 5))
    with pytest.raises(ValueError, match="input channels"):
        winograd_conv3x3(torch.randn(1, 3, 8, 8), winograd_filters(torch.randn(4, 4, 3, 3)))


def test_tiles_gradient_adds_the_overlaps_as_unfolds_gradient_does():
    from seglab.ops.winograd import _InputTiles

    for n, rows, cols, channels in [(2, 3, 5, 4), (1, 1, 1, 3), (3, 4, 2, 1)]:
        padded = torch.randn(n, 4 * rows + 2, 4 * cols + 2, channels, requires_grad=True)
        upstream = torch.randn(6, 6, n * rows * cols, channels)
        tiles = _InputTiles.apply(padded)
        expected = padded.unfold(1, 6, 4).unfold(2, 6, 4).permute(4, 5, 0, 1, 2, 3).reshape(6, 6, -1, channels)
        assert torch.equal(tiles, expected)
        got, = torch.autograd.grad(tiles, padded, upstream)
        want, = torch.autograd.grad(expected, padded, upstream)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # the same sums, in another order
