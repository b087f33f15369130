"""Multi-head attention over few keys by the native kernel (seglab.ops.token_attention,
`native.attention`): PyTorch's attention of the same heads in float32 and in bf16, keys that
fill no whole vector, extreme scores, and one-line refusals of what it does not take."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seglab.ops import native
from seglab.ops.token_attention import attention_fits, native_attention_available

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"the native kernels are not available: {native.unavailable_reason()}")


def _attention(queries: torch.Tensor, keys_values: torch.Tensor, heads: int, scale: float | None = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """PyTorch's attention of the heads, in `dtype`, back as tokens."""
    n, length, channels = queries.shape
    q = queries.to(dtype).reshape(n, length, heads, -1).transpose(1, 2)
    k, v = keys_values.to(dtype).reshape(n, -1, 2, heads, channels // heads).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(n, length, channels)


def _relative(result: torch.Tensor, expected: torch.Tensor) -> float:
    return ((result.double() - expected).norm() / expected.norm()).item()


# (images, queries, keys, heads): MiT's shapes in small, keys short of a vector (4 and 17), one key,
# query blocks left over (70 and 100 queries against blocks of 64)
SHAPES = [(2, 100, 4, 1), (1, 70, 17, 2), (2, 64, 256, 5), (1, 5, 1, 8), (1, 129, 32, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_native_attention_is_pytorchs_in_float32(shape):
    n, length, keys, heads = shape
    queries, keys_values = torch.randn(n, length, 32 * heads), torch.randn(n, keys, 64 * heads)
    result = native.attention(queries, keys_values, heads)
    assert result.shape == queries.shape and result.dtype == torch.float32 and result.is_contiguous()
    assert _relative(result, _attention(queries, keys_values, heads)) < 2e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_native_attention_in_bf16_rounds_no_more_than_pytorchs(shape):
    n, length, keys, heads = shape
    queries = torch.randn(n, length, 32 * heads).bfloat16()
    keys_values = torch.randn(n, keys, 64 * heads).bfloat16()
    result = native.attention(queries, keys_values, heads)
    assert result.dtype == torch.bfloat16
    expected = _attention(queries, keys_values, heads)  # of the same bf16 values, in float64
    pytorchs = _relative(_attention(queries, keys_values, heads, dtype=torch.bfloat16), expected)
    # the output's own rounding to bf16 is 2^-9 of each value; the exps' rounding (both round
    # them for the second product) adds about as much again
    assert _relative(result, expected) < max(1.25 * pytorchs, 4e-3)


def test_native_attention_takes_a_scale_and_extreme_scores():
    queries, keys_values = torch.randn(1, 40, 32), torch.randn(1, 20, 64)
    result = native.attention(queries, keys_values, 1, scale=0.05)
    assert _relative(result, _attention(queries, keys_values, 1, scale=0.05)) < 2e-6
    # every score near -2,000 (a padded key's -inf must not become the maximum, nor exps underflow)
    queries, keys_values = torch.full((1, 3, 32), 8.0), torch.full((1, 5, 64), -8.0)
    keys_values[..., 32:] = torch.arange(5.0)[:, None]
    result = native.attention(queries, keys_values, 1, scale=1.0)
    torch.testing.assert_close(result, torch.full((1, 3, 32), 2.0))  # equal scores: the values' mean


def test_native_attention_refuses_what_it_does_not_take_in_one_line():
    queries, keys_values = torch.randn(1, 8, 32), torch.randn(1, 4, 64)
    for bad, message in [
        (lambda: native.attention(queries, keys_values[..., :32].contiguous(), 1), "N x S x 2C"),
        (lambda: native.attention(torch.randn(1, 8, 24), torch.randn(1, 4, 48), 1), "multiple of 16"),
        (lambda: native.attention(queries, keys_values, 3), "multiple of 16"),
        (lambda: native.attention(queries, torch.randn(1, 0, 64), 1), "at least one key"),
        (lambda: native.attention(queries, keys_values.bfloat16(), 1), "keys and values must be"),
        (lambda: native.attention(queries.double(), keys_values.double(), 1), "queries must be"),
        (lambda: native.attention(queries, keys_values, 1, scale=0.0), "positive scale"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            bad()
        assert "\n" not in str(error.value)


def test_attention_fits_bf16_inference_only():
    queries, keys_values = torch.randn(2, 16, 64).bfloat16(), torch.randn(2, 4, 128).bfloat16()
    with torch.inference_mode():
        assert attention_fits(queries, keys_values, 2) == native_attention_available()
        assert not attention_fits(queries.float(), keys_values.float(), 2)  # float32: PyTorch's ran faster
        assert attention_fits(queries, keys_values, 4) == native_attention_available()  # heads of 16 channels
        assert not attention_fits(queries, keys_values, 8)  # heads of 8 channels: not a whole vector
        assert not attention_fits(queries, keys_values[..., :64], 2)
    assert not attention_fits(queries.requires_grad_(), keys_values, 2)  # gradients recorded
