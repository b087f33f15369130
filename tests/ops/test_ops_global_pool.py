"""Global average pooling: AdaptiveAvgPool2d(1)'s values and gradients, in the input's layout."""
import pytest
import torch
import torch.nn as nn

from seglab.ops.context import ASPP
from seglab.ops.global_pool import global_average_pool

CL = torch.channels_last


def _layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "nchw"
    return "channels_last" if t.is_contiguous(memory_format=CL) else "strided"


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_values_and_gradients_are_adaptive_average_pooling_s_in_the_input_s_layout(layout):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    reference = x.detach().clone().requires_grad_()
    upstream = torch.randn(2, 5, 1, 1, dtype=torch.float64)
    y = global_average_pool(x)
    expected = nn.AdaptiveAvgPool2d(1)(reference)
    torch.testing.assert_close(y, expected)
    y.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x.grad, reference.grad)
    assert _layout(x.grad) == ("channels_last" if layout == CL else "nchw")
    assert torch.autograd.gradcheck(global_average_pool, (x.detach().requires_grad_(),))


def test_without_gradients_it_is_a_plain_mean():
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        y = global_average_pool(x.requires_grad_())
    assert y.grad_fn is None and torch.equal(y, x.mean((2, 3), keepdim=True))


def test_aspp_hands_back_a_channels_last_gradient_to_a_channels_last_map():
    # Each branch's gradient is summed into the map's; before, the image-level branch's came
    # back NCHW and made the sum (and the backward after it) mix layouts.
    torch.manual_seed(0)
    aspp = ASPP(32, 16, rates=(2, 3, 4), dropout=0.0).to(memory_format=CL).train()
    leaf = torch.randn(2, 32, 9, 9).contiguous(memory_format=CL).requires_grad_()
    x = leaf.clone()
    seen = []
    x.register_hook(seen.append)
    aspp(x).square().mean().backward()
    assert _layout(seen[0]) == "channels_last"
