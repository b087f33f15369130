"""contiguous_gradient: identity forward, contiguous gradient backward."""
from __future__ import annotations

import torch

from seglab.ops.gradient_layout import contiguous_gradient


def test_forward_is_the_identity_and_the_gradient_arrives_contiguous():
    x = torch.randn(2, 6, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    seen = {}

    def record(grad):
        seen["grad"] = grad

    y = x * 2  # an operator before the helper: the hook sees what flows back into it
    y.register_hook(record)
    z = contiguous_gradient(y)
    torch.testing.assert_close(z, y)
    joined = torch.cat([z, torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)], 1)
    upstream = torch.randn(joined.shape).contiguous(memory_format=torch.channels_last)
    joined.backward(upstream)
    assert seen["grad"].is_contiguous(memory_format=torch.channels_last)  # not cat's strided slice
    torch.testing.assert_close(seen["grad"], upstream[:, :6])
    torch.testing.assert_close(x.grad, 2 * upstream[:, :6])


def test_nothing_happens_without_gradients():
    x = torch.randn(1, 2, 3, 3)
    assert contiguous_gradient(x) is x
    with torch.no_grad():
        y = torch.randn(1, 2, 3, 3, requires_grad=True)
        assert contiguous_gradient(y) is y
