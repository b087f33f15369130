"""Conv blocks (separable, atrous), ASPP, pyramid pooling and the pad/crop helpers."""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.ops import ASPP, ConvNormAct, PyramidPooling, SeparableConvNormAct, atrous_conv, crop_to, pad_to_multiple


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_separable_conv_has_depthwise_plus_pointwise_weights():
    separable = SeparableConvNormAct(32, 64, 3)
    assert _count(separable) == 32 * 9 + 32 * 64 + 2 * 64  # depthwise, pointwise, BN
    assert _count(separable) < _count(ConvNormAct(32, 64, 3)) / 5
    assert separable(torch.rand(2, 32, 9, 7)).shape == (2, 64, 9, 7)


def test_atrous_conv_keeps_size_and_widens_the_field_of_view():
    conv = atrous_conv(1, 1, rate=4, norm=None)
    nn.init.ones_(conv[0].weight)
    nn.init.zeros_(conv[0].bias)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1.0
    response = conv(impulse)[0, 0]
    assert response.shape == (21, 21)
    touched = (response > 0).nonzero()
    # Taps 4 pixels apart: the impulse reaches rows/columns 6, 10 and 14 only (field of view 9).
    assert set(touched[:, 0].tolist()) == {6, 10, 14} and set(touched[:, 1].tolist()) == {6, 10, 14}


def test_aspp_branches_and_output():
    aspp = ASPP(16, 8, rates=(2, 4, 6))
    assert len(aspp.branches) == 5  # 1x1, three atrous, image pooling
    assert [b[0].dilation for b in list(aspp.branches)[1:4]] == [(2, 2), (4, 4), (6, 6)]
    assert aspp.train()(torch.rand(1, 16, 7, 9)).shape == (1, 8, 7, 9)  # batch of one in training


def test_aspp_image_pooling_branch_is_constant_over_space():
    aspp = ASPP(4, 3).eval()
    pooled = aspp.branches[-1](torch.rand(2, 4, 6, 5))
    assert torch.allclose(pooled, pooled[..., :1, :1].expand_as(pooled))


def test_aspp_keeps_the_input_layout_through_the_concatenation():
    # A channels-last input gives a channels-last concatenation (the pooled branch included),
    # which the projection reads without a copy; NCHW stays NCHW. Same values either way.
    torch.manual_seed(0)
    aspp = ASPP(8, 4, rates=(1, 2, 3)).eval()
    x = torch.rand(2, 8, 6, 5)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert aspp.branches[-1](cl).is_contiguous(memory_format=torch.channels_last)
    assert aspp.branches[-1](x).is_contiguous()
    joined = torch.cat([branch(cl) for branch in aspp.branches], 1)
    assert joined.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(aspp(cl), aspp(x))


def test_aspp_pooled_branch_normalises_like_bn_on_the_pooled_vector():
    # Normalising the broadcast map must equal normalising the 1x1 map for a batch > 1.
    aspp = ASPP(4, 3).train()
    branch = aspp.branches[-1]
    x = torch.rand(5, 4, 6, 5)
    pooled = branch.conv(branch.pool(x))
    expected = torch.relu(nn.functional.batch_norm(pooled, None, None, branch.norm.weight, branch.norm.bias, training=True))
    torch.testing.assert_close(branch(x)[..., :1, :1], expected)


def test_pyramid_pooling_reduces_each_bin_to_a_quarter_and_concatenates():
    ppm = PyramidPooling(32, bins=(1, 2, 3, 6))
    assert [stage.conv.out_channels for stage in ppm.stages] == [8, 8, 8, 8]
    out = ppm.train()(torch.rand(1, 32, 13, 11))
    assert out.shape == (1, 64, 13, 11)


def test_pad_to_multiple_and_crop_round_trip():
    x = torch.rand(1, 3, 33, 17)
    padded = pad_to_multiple(x, 16)
    assert padded.shape[-2:] == (48, 32)
    assert torch.equal(crop_to(padded, x.shape[-2:]), x)
    assert pad_to_multiple(torch.rand(1, 1, 32, 32), 32).shape[-2:] == (32, 32)


def test_pad_to_multiple_skips_the_copy_in_eager_code_only():
    exact = torch.rand(1, 1, 32, 32)
    assert pad_to_multiple(exact, 32) is exact  # nothing to pad: no copy
    # A trace made on an exact size must still pad other sizes (no branch frozen into it).
    traced = torch.jit.trace(lambda x: pad_to_multiple(x, 32), (exact,))
    assert traced(torch.rand(1, 1, 33, 40)).shape[-2:] == (64, 64)
