"""The 3x3 convolution to few outputs with vectors along the pixels (the kernel itself:
test_ops_native.py)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.ops import native
from seglab.ops.planar_conv import arranged_weights, planar_conv3x3, planar_conv_fits, planar_conv_takes


def test_it_takes_same_padded_3x3_convolutions_to_outputs_that_leave_vectors_part_empty():
    assert planar_conv_takes(nn.Conv2d(16, 21, 3, padding=1))  # U-Net's head
    assert planar_conv_takes(nn.Conv2d(128, 5, 3, padding=1, bias=False))
    assert not planar_conv_takes(nn.Conv2d(16, 32, 3, padding=1))  # whole vectors: oneDNN's kernel fills them
    assert not planar_conv_takes(nn.Conv2d(20, 21, 3, padding=1))  # inputs transposed 16 x 16 at a time
    assert not planar_conv_takes(nn.Conv2d(16, 21, 1))
    assert not planar_conv_takes(nn.Conv2d(16, 21, 3, padding=1, stride=2))
    assert not planar_conv_takes(nn.Conv2d(16, 21, 3, padding=2, dilation=2))
    assert not planar_conv_takes(nn.Conv2d(16, 21, 3))  # no padding
    assert not planar_conv_takes(nn.Conv2d(16, 21, 3, padding=1, padding_mode="reflect"))


def test_calls_that_run_natively():
    weight = torch.zeros(21, 16, 3, 3)
    x = torch.zeros(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    assert planar_conv_fits(x, weight) == native.available()
    assert not planar_conv_fits(x.contiguous(), weight)  # NCHW
    assert not planar_conv_fits(x.double(), weight.double())
    assert not planar_conv_fits(x, weight.requires_grad_())  # training keeps PyTorch's convolution
    assert not planar_conv_fits(x[0], weight)
    traced = []
    torch.jit.trace(lambda t: traced.append(planar_conv_fits(t, weight)) or t, (x,), check_trace=False)
    assert traced == [False]


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
@pytest.mark.parametrize("bias", [True, False])
def test_the_arranged_weights_give_the_convolution(bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 21, 3, padding=1, bias=bias)
    taps, biases = arranged_weights(conv.weight, conv.bias)
    assert taps.shape == (3, 3, 32, 21) and biases.shape == (21,)
    x = torch.randn(2, 32, 19, 40).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                            padding=1)
        out = planar_conv3x3(x, taps, biases, 21, relu=True)
    assert out.is_contiguous()  # planar scores
    torch.testing.assert_close(out.double(), expected.relu(), rtol=0, atol=2e-6 * expected.abs().max().item())
    assert arranged_weights(torch.zeros(5, 16, 3, 3), None)[0].shape == (3, 3, 16, 7)  # padded to a block
