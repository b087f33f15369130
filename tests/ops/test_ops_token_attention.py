"""Multi-head attention over few keys by the native kernel (seglab.ops.token_attention,
`native.attention`): PyTorch's attention of the same heads in float32 and in bf16, keys that
fill no whole vector, extreme scores, and one-line refusals of what it does not take; the
softmax it writes out, and the training route's gradients against PyTorch's."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from seglab.ops import native
from seglab.ops.token_attention import (attention_fits, native_attention_available, native_training_attention,
                                        training_attention_fits)

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
    """The error's norm over the expected one's; for an expected zero (a query's gradient over one
    key), the error's norm."""
    error = (result.double() - expected).norm()
    return (error / expected.norm() if expected.norm() > 0 else error).item()


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


def _softmax(queries: torch.Tensor, keys_values: torch.Tensor, heads: int) -> torch.Tensor:
    """The heads' softmax, N x heads x L x S, in float64."""
    n, length, channels = queries.shape
    q = queries.double().reshape(n, length, heads, -1).transpose(1, 2)
    k = keys_values.double().reshape(n, -1, 2, heads, channels // heads)[:, :, 0].transpose(1, 2)
    return (q @ k.transpose(-1, -2) * (channels // heads) ** -0.5).softmax(-1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_attention_writes_its_softmax_where_asked(shape, dtype):
    n, length, keys, heads = shape
    queries, keys_values = torch.randn(n, length, 32 * heads, dtype=dtype), torch.randn(n, keys, 64 * heads, dtype=dtype)
    probabilities = torch.full((n, heads, length, keys), float("nan"), dtype=dtype)
    result = native.attention(queries, keys_values, heads, probabilities=probabilities)
    assert torch.equal(result, native.attention(queries, keys_values, heads))  # the same output
    expected = _softmax(queries, keys_values, heads)
    # float32 to its rounding; bf16 rounded once (to nearest: 2^-8 of the value at most)
    tolerance = 1e-6 if dtype == torch.float32 else 1.01 * 2 ** -8
    assert ((probabilities.double() - expected).abs() <= tolerance * expected + 1e-7).all()


def test_native_attention_refuses_a_softmax_it_cannot_write_in_one_line():
    queries, keys_values = torch.randn(1, 8, 32), torch.randn(1, 4, 64)
    for probabilities, message in [(torch.empty(1, 1, 8, 5), r"must be \(1, 1, 8, 4\)"),
                                   (torch.empty(1, 1, 8, 4).bfloat16(), "probabilities must be a contiguous float32")]:
        with pytest.raises(ValueError, match=message) as error:
            native.attention(queries, keys_values, 1, probabilities=probabilities)
        assert "\n" not in str(error.value)


needs_pairs = pytest.mark.skipif(not native_attention_available(), reason="bf16 pair products need AVX-512 BF16")


def _score_grads(grad: torch.Tensor, queries: torch.Tensor, keys_values: torch.Tensor, heads: int) -> torch.Tensor:
    """p (dp - rowsum(p dp)), dp = grad v^T, per head, in float64 from the same values."""
    n, length, channels = queries.shape
    q = queries.double().reshape(n, length, heads, -1).transpose(1, 2)
    k, v = keys_values.double().reshape(n, -1, 2, heads, channels // heads).permute(2, 0, 3, 1, 4)
    d = grad.double().reshape(n, length, heads, -1).transpose(1, 2)
    p = (q @ k.transpose(-1, -2) * (channels // heads) ** -0.5).softmax(-1)
    dp = d @ v.transpose(-1, -2)
    return p * (dp - (p * dp).sum(-1, keepdim=True))


@needs_pairs
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alike", [False, True])
def test_score_grads_round_once_even_where_values_are_alike(shape, alike):
    """Values alike (one vector plus 2% noise, as keys pooled from neighbouring pixels): dp -
    rowsum(p dp) cancels, and PyTorch's bf16 operators lose most of its bits there; the kernel's
    float32 products and its mean over the stored weights' own sum leave bf16's roundings of p
    and of the result."""
    n, length, keys, heads = shape
    torch.manual_seed(0)
    queries, keys_values = torch.randn(n, length, 32 * heads), torch.randn(n, keys, 64 * heads)
    if alike:
        keys_values[:, :, 32 * heads:] = keys_values[:, :1, 32 * heads:] + 0.02 * torch.randn(n, keys, 32 * heads)
    queries, keys_values, grad = queries.bfloat16(), keys_values.bfloat16(), torch.randn(n, length, 32 * heads).bfloat16()
    probabilities = torch.empty(n, heads, length, keys, dtype=torch.bfloat16)
    native.attention(queries, keys_values, heads, probabilities=probabilities)
    result = native.attention_score_grads(grad, keys_values, probabilities, heads)
    assert result.dtype == torch.bfloat16 and result.shape == (n, heads, length, keys) and result.is_contiguous()
    assert _relative(result, _score_grads(grad, queries, keys_values, heads)) < 4e-3


@needs_pairs
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_attention_grads_are_the_products_of_the_rounded_score_grads(shape, threads, monkeypatch):
    """dq = scale ds k, dk = scale ds^T q and dv = p^T dO from the very rows of ds that
    `attention_score_grads` returns (bf16), summed in float32: float64 products of those rows,
    within bf16's one rounding of the result, however many ranges of blocks the threads split
    the queries into."""
    n, length, keys, heads = shape
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(1)
    queries, keys_values = torch.randn(n, length, 32 * heads).bfloat16(), torch.randn(n, keys, 64 * heads).bfloat16()
    grad = torch.randn(n, length, 32 * heads).bfloat16()
    probabilities = torch.empty(n, heads, length, keys, dtype=torch.bfloat16)
    native.attention(queries, keys_values, heads, probabilities=probabilities)
    score_grads = native.attention_score_grads(grad, keys_values, probabilities, heads).double()
    query_grads, key_value_grads = native.attention_grads(grad, queries, keys_values, probabilities, heads, scale=0.3)
    q = queries.double().reshape(n, length, heads, 32).transpose(1, 2)
    k, _ = keys_values.double().reshape(n, keys, 2, heads, 32).permute(2, 0, 3, 1, 4)
    d = grad.double().reshape(n, length, heads, 32).transpose(1, 2)
    expected_q = (0.3 * score_grads @ k).transpose(1, 2).reshape(n, length, 32 * heads)
    expected_kv = torch.stack((0.3 * score_grads.transpose(-1, -2) @ q, probabilities.double().transpose(-1, -2) @ d))
    expected_kv = expected_kv.permute(1, 3, 0, 2, 4).reshape(n, keys, 64 * heads)
    for result, expected in ((query_grads, expected_q), (key_value_grads, expected_kv)):
        assert result.dtype == torch.bfloat16 and result.shape == expected.shape and result.is_contiguous()
        assert ((result.double() - expected).abs() <= 2 ** -8 * expected.abs() + 1e-6).all()
    with pytest.raises(ValueError, match="queries shaped as the gradient"):
        native.attention_grads(grad, torch.empty(n, length + 1, 32 * heads, dtype=torch.bfloat16), keys_values,
                               probabilities, heads)
    with pytest.raises(ValueError, match="positive scale"):
        native.attention_grads(grad, queries, keys_values, probabilities, heads, scale=0.0)


def test_score_grads_refuse_what_they_do_not_take_in_one_line():
    grad, keys_values = torch.randn(1, 8, 32).bfloat16(), torch.randn(1, 4, 64).bfloat16()
    probabilities = torch.full((1, 1, 8, 4), 0.25).bfloat16()
    with mock.patch.object(native, "bf16_pairs", return_value=False), pytest.raises(ValueError, match="AVX-512 BF16"):
        native.attention_score_grads(grad, keys_values, probabilities, 1)
    if not native_attention_available():
        return
    for bad, message in [
        (lambda: native.attention_score_grads(grad, keys_values[..., :32].contiguous(), probabilities, 1), "N x S x 2C"),
        (lambda: native.attention_score_grads(grad, keys_values, probabilities[..., :3].contiguous(), 1),
         "N x heads x L x S"),
        (lambda: native.attention_score_grads(grad, keys_values, torch.full((1, 4, 8, 4), 0.25).bfloat16(), 4),
         "multiple of 16"),
        (lambda: native.attention_score_grads(grad.float(), keys_values, probabilities, 1), "gradient must be"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            bad()
        assert "\n" not in str(error.value)


@needs_pairs
@pytest.mark.parametrize("shape", SHAPES)
def test_training_attention_gradients_err_like_pytorchs_bf16_attention(shape):
    """Output and both gradients against float64, next to PyTorch's bf16 attention (flash) on the
    same bf16 values: the backward's three matrix products round their outputs to bf16 where
    flash keeps float32 inside, so the bound allows up to twice its error."""
    n, length, keys, heads = shape
    torch.manual_seed(0)
    queries = torch.randn(n, length, 32 * heads).bfloat16().requires_grad_()
    keys_values = torch.randn(n, keys, 64 * heads).bfloat16().requires_grad_()
    grad = torch.randn(n, length, 32 * heads).bfloat16()
    assert training_attention_fits(queries, keys_values, heads)
    results = {}
    for name, function in (("native", native_training_attention),
                           ("pytorch", lambda q, kv, h: _attention(q, kv, h, dtype=torch.bfloat16))):
        out = function(queries, keys_values, heads)
        out.backward(grad)
        results[name] = (out.detach(), queries.grad, keys_values.grad)
        queries.grad = keys_values.grad = None
    exact = [t.detach().double().requires_grad_() for t in (queries, keys_values)]
    out = _attention(*exact, heads)
    out.backward(grad.double())
    expected = (out.detach(), exact[0].grad, exact[1].grad)
    for what, native_value, pytorch_value, exact_value in zip(("output", "queries", "keys and values"),
                                                              results["native"], results["pytorch"], expected):
        assert native_value.dtype == torch.bfloat16 and native_value.shape == exact_value.shape
        assert _relative(native_value, exact_value) < max(2 * _relative(pytorch_value, exact_value), 8e-3), what


@needs_pairs
def test_training_attention_keeps_the_queries_gradient_where_values_are_alike():
    """Values alike (as above): the queries' gradient to bf16's rounding (PyTorch's bf16 flash
    attention, whose row term is dO . o with o in bf16, was 12% off on these shapes)."""
    torch.manual_seed(0)
    queries, keys_values = torch.randn(2, 1024, 64), torch.randn(2, 64, 128)
    keys_values[:, :, 64:] = keys_values[:, :1, 64:] + 0.02 * torch.randn(2, 64, 64)
    queries, keys_values = queries.bfloat16().requires_grad_(), keys_values.bfloat16().requires_grad_()
    grad = torch.randn(2, 1024, 64).bfloat16()
    native_training_attention(queries, keys_values, 2).backward(grad)
    exact = [t.detach().double().requires_grad_() for t in (queries, keys_values)]
    _attention(*exact, 2).backward(grad.double())
    assert _relative(queries.grad, exact[0].grad) < 5e-3
    assert _relative(keys_values.grad, exact[1].grad) < 5e-3


@needs_pairs
def test_training_attention_computes_only_the_gradients_asked_for():
    queries, keys_values = torch.randn(1, 70, 32).bfloat16(), torch.randn(1, 17, 64).bfloat16().requires_grad_()
    with mock.patch.object(native, "attention_grads", wraps=native.attention_grads) as grads:
        native_training_attention(queries, keys_values, 1).sum().backward()
    assert keys_values.grad is not None and grads.call_args.kwargs["keys_values_grad"]
    queries.requires_grad_()
    keys_values = keys_values.detach()
    with mock.patch.object(native, "attention_grads", wraps=native.attention_grads) as grads:
        native_training_attention(queries, keys_values, 1).sum().backward()
    assert queries.grad is not None and not grads.call_args.kwargs["keys_values_grad"]  # no keys' sums taken


def test_training_attention_fits_bf16_with_gradients_and_a_softmax_of_bounded_size():
    queries = torch.randn(2, 16, 64).bfloat16().requires_grad_()
    keys_values = torch.randn(2, 4, 128).bfloat16()
    assert training_attention_fits(queries, keys_values, 2) == native_attention_available()
    assert not training_attention_fits(queries.detach(), keys_values, 2)  # inference: `attention_fits`
    assert not training_attention_fits(queries.float(), keys_values.float(), 2)
    assert not training_attention_fits(queries, keys_values, 8)  # heads of 8 channels
    with mock.patch("seglab.ops.token_attention.MAX_KEPT_PROBABILITIES", 2 * 2 * 16 * 4 - 1):
        assert not training_attention_fits(queries, keys_values, 2)  # the softmax kept would be too large
