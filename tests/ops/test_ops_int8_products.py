"""Training's int8 products with one scale per row (seglab.ops.int8_products)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.ops import int8_products, native
from seglab.ops.int8_products import (
    MIN_PRODUCT_CHANNELS,
    dequantize_rows,
    int8_pointwise_candidates,
    int8_pointwise_conv,
    int8_product,
    quantize_rows,
    takes_int8_pointwise,
)

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm()).detach())


def _operators(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's operators instead of the native kernels."""
    monkeypatch.setattr(int8_products.native, "available", lambda: False)


@pytest.mark.parametrize("path", ["native", "operators"])
def test_quantize_rows_gives_each_row_its_own_symmetric_scale(path, monkeypatch):
    if path == "native" and not native.available():
        pytest.skip("no native kernels")
    if path == "operators":
        _operators(monkeypatch)
    x = torch.randn(70, 37) * torch.logspace(-3, 3, 70)[:, None]  # rows six decades apart
    x[5] = 0.0
    levels, scales = quantize_rows(x)
    assert levels.dtype == torch.int8 and scales.shape == (70,)
    assert torch.equal(scales, x.abs().amax(1) / 127)
    assert levels[5].abs().sum() == 0 and scales[5] == 0  # a row of zeros stays zero
    assert torch.equal(levels.abs().amax(1)[scales > 0], torch.full((69,), 127, dtype=torch.int8))
    error = (levels.float() * scales[:, None] - x).abs()
    assert torch.all(error <= scales[:, None] * 0.5001)  # rounded to the nearest level of its own row


@needs_native
def test_native_quantize_rows_matches_the_operators_bit_for_bit_on_strided_rows(monkeypatch):
    wide = torch.randn(300, 530) * 3
    x = wide[:, 7:524]  # rows 530 apart, 517 columns: the vector loop and the scalar tail
    levels, scales = native.quantize_rows_s8(x)
    _operators(monkeypatch)
    expected_levels, expected_scales = quantize_rows(x)
    assert torch.equal(scales, expected_scales) and torch.equal(levels, expected_levels)


@needs_native
def test_native_quantize_rows_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 63.5, -127.0] * 3])  # scale 1: levels are x rounded
    levels, scales = native.quantize_rows_s8(x)
    assert scales.tolist() == [1.0]
    assert levels[0, :8].tolist() == [127, 0, 2, 2, 0, -2, 64, -127] and torch.equal(levels[0, :8], levels[0, 16:])


@needs_native
def test_native_quantizers_refuse_what_they_cannot_read_with_one_clear_error():
    with pytest.raises(ValueError, match="float32"):
        native.quantize_rows_s8(torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous rows"):
        native.quantize_rows_s8(torch.zeros(8, 4).t())
    with pytest.raises(ValueError, match="int32"):
        native.dequantize_rows(torch.zeros(4, 8), torch.ones(4), torch.ones(8))
    with pytest.raises(ValueError, match="column scales"):
        native.dequantize_rows(torch.zeros(4, 8, dtype=torch.int32), torch.ones(4), torch.ones(7))
    with pytest.raises(ValueError, match="adds to a contiguous float32"):
        native.dequantize_rows(torch.zeros(4, 8, dtype=torch.int32), torch.ones(4), torch.ones(8), out=torch.zeros(8, 4).t())


@pytest.mark.parametrize("with_bias", [False, True])
def test_dequantize_rows_scales_by_row_and_column(with_bias, monkeypatch):
    products = torch.randint(-2**20, 2**20, (50, 40), dtype=torch.int32)
    rows, columns = torch.rand(50), torch.rand(40)
    bias = torch.randn(40) if with_bias else None
    expected = products.double() * rows.double()[:, None] * columns.double()[None, :]
    if with_bias:
        expected += bias.double()
    computed = dequantize_rows(products, rows, columns, bias)
    torch.testing.assert_close(computed.double(), expected, rtol=1e-6, atol=1e-3)
    start = torch.randn(50, 40)  # added to in the same pass: a sum over a kernel's taps
    added = dequantize_rows(products, rows, columns, bias, out=start.clone())
    torch.testing.assert_close(added.double(), expected + start.double(), rtol=1e-6, atol=1e-3)
    _operators(monkeypatch)
    torch.testing.assert_close(dequantize_rows(products, rows, columns, bias), computed, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(dequantize_rows(products, rows, columns, bias, out=start.clone()), added,
                               rtol=1e-6, atol=1e-3)


def test_int8_product_is_close_to_the_float32_product():
    # Rows of 256 normal values: absmax about 2.9, a level 2.9 / 127, rounding errors of
    # 0.0066 per factor, 0.0093 in the product; over 200 seeds 0.0096-0.0101 (the bound was
    # 0.01 once, and failed on a few seeds).
    torch.manual_seed(0)
    a, b = torch.randn(200, 256), torch.randn(96, 256)
    exact = a @ b.t()
    assert 1e-3 < _relative(int8_product(a, b), exact) < 0.0125
    assert 1e-3 < _relative(int8_product(a, b, torch.ones(96)), exact + 1) < 0.0125


@pytest.mark.parametrize("stride", [1, 2])
def test_int8_pointwise_conv_rounds_the_forward_and_input_gradient_only(stride):
    torch.manual_seed(0)
    x = torch.randn(2, 128, 12, 10).relu().contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(64, 128, 1, 1) / 128 ** 0.5).requires_grad_()
    bias = torch.randn(64).requires_grad_()
    upstream = torch.randn(2, 64, 12 // stride, 10 // stride)
    out = int8_pointwise_conv(x, weight, bias, stride)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.backward(upstream)
    gradients = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    exact = F.conv2d(x, weight, bias, stride=stride)
    exact.backward(upstream)
    assert 1e-5 < _relative(out, exact) < 0.01  # rounded, by well under a percent
    assert 1e-5 < _relative(gradients[0], x.grad) < 0.02
    torch.testing.assert_close(gradients[1], weight.grad, rtol=1e-4, atol=1e-4)  # float32's weight gradient
    torch.testing.assert_close(gradients[2], bias.grad, rtol=1e-4, atol=1e-4)
    if stride == 2:  # the pixels the stride skips get no gradient
        assert gradients[0][:, :, 1::2].abs().sum() == 0 and gradients[0][:, :, :, 1::2].abs().sum() == 0


def test_int8_pointwise_conv_takes_an_nchw_map_too():
    x = torch.randn(1, 64, 5, 6)
    weight = torch.randn(32, 64, 1, 1)
    assert _relative(int8_pointwise_conv(x, weight), F.conv2d(x, weight)) < 0.01


def test_takes_int8_pointwise_only_large_float32_1x1_convolutions_on_channels_last_maps():
    def conv(cin: int = 256, cout: int = 512, **options) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, options.pop("kernel_size", 1), **options)

    x = torch.randn(1, 256, 8, 8).contiguous(memory_format=torch.channels_last)
    assert 256 * 512 >= MIN_PRODUCT_CHANNELS and takes_int8_pointwise(conv(), x)
    assert takes_int8_pointwise(conv(stride=2), x)
    assert not takes_int8_pointwise(conv(cout=64), x)  # too few channel pairs to pay for quantizing
    assert not takes_int8_pointwise(conv(kernel_size=3, padding=1), x)
    assert not takes_int8_pointwise(conv(groups=2), x)
    assert not takes_int8_pointwise(conv(stride=(1, 2)), x)
    assert not takes_int8_pointwise(conv(), x.contiguous())  # NCHW
    assert not takes_int8_pointwise(conv(), x.to(torch.bfloat16))


def test_int8_pointwise_candidates_counts_the_1x1_convolutions_the_products_would_take():
    model = nn.Sequential(
        nn.Conv2d(256, 512, 1),  # taken
        nn.Conv2d(512, 256, 1, stride=2),  # taken: a strided 1x1 reads every other pixel
        nn.Conv2d(512, 64, 1),  # too few channel pairs
        nn.Conv2d(256, 512, 3, padding=1),  # not a 1x1 convolution
        nn.Conv2d(256, 512, 1, groups=2),
        nn.Sequential(nn.Conv2d(1024, 256, 1)),  # nested modules count too
    )
    assert int8_pointwise_candidates(model) == 3
    assert int8_pointwise_candidates(nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU())) == 0
