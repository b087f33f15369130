"""A linear layer over tokens by the native products (seglab.ops.token_linear): the layer's
function, plus the residual, and PyTorch's operators wherever gradients or dtypes ask."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from seglab.ops import native
from seglab.ops.kept import KeptFromWeights
from seglab.ops.token_linear import linear_fits, token_linear

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"the native kernels are not available: {native.unavailable_reason()}")


def _layer(in_features: int = 32, out_features: int = 32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features)


@pytest.mark.parametrize("residual", [False, True])
def test_token_linear_computes_the_layer_plus_the_residual(residual):
    layer, tokens = _layer(), torch.randn(2, 50, 32)
    shortcut = torch.randn(2, 50, 32) if residual else None
    with torch.inference_mode():
        assert linear_fits(tokens, layer, shortcut)
        result = token_linear(layer, tokens, KeptFromWeights(), natively=True, residual=shortcut)
        expected = layer(tokens) + (0 if shortcut is None else shortcut)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6 * expected.abs().max().item())


def test_token_linear_keeps_pytorchs_operators_where_the_kernel_does_not_fit():
    layer, tokens = _layer(), torch.randn(1, 9, 32)
    assert not linear_fits(tokens, layer)  # gradients recorded for the weights
    with torch.no_grad():
        assert not linear_fits(tokens.double(), layer)
        assert not linear_fits(tokens[..., :8], _layer(8, 24))  # outputs not whole vectors
        assert not linear_fits(tokens, nn.Linear(32, 32, bias=False))
    kept = KeptFromWeights()
    out = token_linear(layer, tokens, kept, natively=True, residual=tokens)
    out.sum().backward()  # the operators' route: differentiable
    assert layer.weight.grad is not None and kept.value is None
