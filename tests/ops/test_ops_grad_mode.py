"""The one test of whether autograd records an operation."""
import torch

from seglab.ops.grad_mode import records_gradients


def test_records_gradients_where_enabled_and_any_tensor_requires_one():
    plain, leaf = torch.zeros(2), torch.zeros(2, requires_grad=True)
    assert records_gradients(plain, leaf) and records_gradients(None, leaf)
    assert not records_gradients(plain) and not records_gradients(plain, None) and not records_gradients()
    with torch.no_grad():
        assert not records_gradients(leaf)
    with torch.inference_mode():
        assert not records_gradients(leaf)
    assert records_gradients(leaf * 2)  # a result of a recorded operation requires a gradient too
