"""Shared checks for ops that compute a convolution another way: same values, same gradients."""
from __future__ import annotations

import torch


def gradients(output: torch.Tensor, upstream: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The gradients of sum(output * upstream) with respect to `inputs`, in upstream's dtype."""
    return torch.autograd.grad((output.to(upstream.dtype) * upstream).sum(), inputs)


def assert_values_and_gradients_equal(ours: torch.Tensor, expected: torch.Tensor, inputs: list[torch.Tensor], *,
                                      values_atol: float = 1e-12, gradients_atol: float = 1e-11) -> None:
    """`ours` equals `expected`, and so do their gradients for a random upstream gradient."""
    torch.testing.assert_close(ours, expected, rtol=0, atol=values_atol)
    upstream = torch.randn(expected.shape, dtype=expected.dtype)
    for a, e in zip(gradients(ours, upstream, inputs), gradients(expected, upstream, inputs)):
        torch.testing.assert_close(a, e, rtol=0, atol=gradients_atol)
