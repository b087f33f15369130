"""The transposed convolution of kernel 2s as one 2x2 convolution to all output phases, against
F.conv_transpose2d: same values, same gradients, in both layouts and under bf16 autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from gradient_checks import assert_values_and_gradients_equal

from seglab.ops import native
from seglab.ops.polyphase import (PolyphaseConvTranspose2d, polyphase_conv_transpose2d, polyphase_weight,
                                  takes_polyphase)
from seglab.ops.upsample import make_upsample


def _inputs(stride: int, c_in: int = 3, c_out: int = 2, height: int = 5, width: int = 7, channels_last: bool = True):
    x = torch.randn(2, c_in, height, width, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_in, c_out, 2 * stride, 2 * stride, dtype=torch.float64)
    bias = torch.randn(c_out, dtype=torch.float64)
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()


@pytest.mark.parametrize("stride", [2, 4, 8, 16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_equals_the_transposed_convolution_and_its_gradients(stride, channels_last):
    x, weight, bias = _inputs(stride, channels_last=channels_last)
    ours = polyphase_conv_transpose2d(x, weight, bias, stride)
    expected = F.conv_transpose2d(x, weight, bias, stride=stride, padding=stride // 2)
    assert ours.shape == expected.shape == (2, 2, 5 * stride, 7 * stride)
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_values_and_gradients_equal(ours, expected, [x, weight, bias])


def test_phase_weight_puts_each_kernel_tap_at_its_phase():
    stride = 4
    weight = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)  # C_in 2, C_out 3
    phases = polyphase_weight(weight, stride)
    assert phases.shape == (4 * 4 * 3, 2, 2, 2)
    # output channel (t_y, t_x, c_out); 2x2 tap 1 reads x[q] (kernel tap t), tap 0 reads x[q-1] (tap s + t)
    t_y, t_x, c_out, c_in = 1, 3, 2, 1
    channel = (t_y * stride + t_x) * 3 + c_out
    assert phases[channel, c_in, 1, 1] == weight[c_in, c_out, t_y, t_x]
    assert phases[channel, c_in, 0, 0] == weight[c_in, c_out, stride + t_y, stride + t_x]
    assert phases[channel, c_in, 0, 1] == weight[c_in, c_out, stride + t_y, t_x]
    assert phases[channel, c_in, 1, 0] == weight[c_in, c_out, t_y, stride + t_x]


def test_under_bf16_autocast_it_runs_in_bf16_like_the_transposed_convolution():
    torch.manual_seed(0)
    conv = PolyphaseConvTranspose2d(8, 5, 16, stride=8, padding=4, bias=False)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        ours = conv(x)
        plain = nn.ConvTranspose2d.forward(conv, x)
    assert ours.dtype == plain.dtype == torch.bfloat16
    exact = F.conv_transpose2d(x.double(), conv.weight.double(), stride=8, padding=4)
    scale = exact.abs().max().item()
    assert (ours.double() - exact).abs().max().item() < 0.02 * scale
    assert (plain.double() - exact).abs().max().item() < 0.02 * scale


def test_only_training_calls_of_the_kernel_twice_the_stride_with_half_stride_padding_are_rewritten():
    x = torch.randn(1, 4, 6, 6)
    assert takes_polyphase(x, nn.ConvTranspose2d(4, 4, 16, stride=8, padding=4))
    assert takes_polyphase(x, nn.ConvTranspose2d(4, 4, 64, stride=32, padding=16))
    with torch.no_grad():  # inference: oneDNN's forward is as fast
        assert not takes_polyphase(x, nn.ConvTranspose2d(4, 4, 16, stride=8, padding=4))
    frozen = nn.ConvTranspose2d(4, 4, 16, stride=8, padding=4).requires_grad_(False)
    assert not takes_polyphase(x, frozen)
    assert takes_polyphase(x.requires_grad_(), frozen)
    x = x.detach()
    assert not takes_polyphase(x, nn.ConvTranspose2d(4, 4, 8, stride=4, padding=2))  # below MIN_STRIDE
    assert not takes_polyphase(x, nn.ConvTranspose2d(4, 4, 15, stride=8, padding=4))  # kernel not 2s
    assert not takes_polyphase(x, nn.ConvTranspose2d(4, 4, 16, stride=8, padding=3))
    assert not takes_polyphase(x, nn.ConvTranspose2d(4, 4, 16, stride=8, padding=4, output_padding=1))
    assert not takes_polyphase(x, nn.ConvTranspose2d(4, 4, 16, stride=8, padding=4, groups=2))
    assert not takes_polyphase(x, nn.ConvTranspose2d(4, 4, 10, stride=5, padding=2))  # odd stride


def test_fcn_upsampling_takes_it_and_keeps_its_state_dict_and_values():
    up = make_upsample("transposed", 21, 21, 8)
    assert isinstance(up.conv, PolyphaseConvTranspose2d)
    assert list(up.state_dict()) == ["conv.weight"]
    x = torch.randn(1, 21, 9, 11).contiguous(memory_format=torch.channels_last)
    assert takes_polyphase(x, up.conv)  # the weight is learnt: the call records gradients
    torch.testing.assert_close(up(x), F.conv_transpose2d(x, up.conv.weight, stride=8, padding=4),
                               rtol=1e-5, atol=1e-5)


def test_a_traced_module_records_the_plain_transposed_convolution():
    conv = PolyphaseConvTranspose2d(3, 3, 16, stride=8, padding=4, bias=False)
    x = torch.randn(1, 3, 5, 5)
    traced = torch.jit.trace(conv, x)
    graph = str(traced.graph)
    assert "aten::_convolution" in graph and "constant_pad_nd" not in graph
    torch.testing.assert_close(traced(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("stride, size", [(2, (3, 4)), (8, (5, 7)), (16, (2, 3)), (8, (1, 1))])
def test_the_native_interleave_gives_the_copies_values_both_ways(dtype, stride, size, monkeypatch):
    """The phase map's interleave by the native runs against PyTorch's strided copies: the same
    output and the same gradient, zeros included where the crop drops phases."""
    from seglab.ops.polyphase import _Interleave
    torch.manual_seed(0)
    height, width = size
    phases = torch.randn(2, stride * stride * 3, height + 1, width + 1).to(dtype).contiguous(
        memory_format=torch.channels_last)
    upstream = torch.randn(2, 3, height * stride, width * stride).to(dtype)
    results = []
    for built in (True, False):
        monkeypatch.setattr(native, "available", lambda built=built: built)
        leaf = phases.clone().requires_grad_()
        output = _Interleave.apply(leaf, stride)
        output.backward(upstream)
        results.append((output, leaf.grad))
    (output, grad), (expected_output, expected_grad) = results
    assert output.is_contiguous(memory_format=torch.channels_last) and torch.equal(output, expected_output)
    assert torch.equal(grad, expected_grad) and (grad == 0).any()
