"""Bilinear upsampling by a whole factor (width pass as a matrix product, height pass as row
blends) against F.interpolate."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seglab.ops.bilinear import add_bilinear_upsampled_, bilinear_upsample_by, whole_scale
from seglab.ops.upsample import native_score_upsampling, upsample_scores


def _channels_last(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 21, 16, 16), (2, 3, 7, 45), (1, 1, 1, 5), (1, 4, 33, 70)])
def test_equals_f_interpolate(scale, shape):
    torch.manual_seed(0)
    x = _channels_last(*shape)  # widths below, at and above one block, not multiples of it
    ours = bilinear_upsample_by(x, scale, block=32)
    expected = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert ours.is_contiguous(memory_format=torch.channels_last)


def test_small_blocks_and_float32():
    torch.manual_seed(0)
    x = _channels_last(2, 5, 9, 13, dtype=torch.float32)
    expected = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(bilinear_upsample_by(x, 4, block=4), expected, rtol=1e-6, atol=1e-6)


def test_rejects_nchw():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="channels-last"):
        bilinear_upsample_by(x, 2)


def test_whole_scale():
    x = torch.zeros(1, 2, 8, 10)
    assert whole_scale(x, (32, 40)) == 4
    assert whole_scale(x, (32, 41)) is None  # not the same factor on both sides
    assert whole_scale(x, (8, 10)) is None  # nothing to enlarge
    assert whole_scale(x, (12, 15)) is None  # not a whole factor


@pytest.mark.parametrize("kernel", ["native", "two-pass"])
def test_upsample_scores_takes_the_fast_route_in_inference_mode(kernel, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from seglab.ops import native

    if kernel == "native" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    if kernel == "two-pass":
        monkeypatch.setattr(native, "available", lambda: False)
    torch.manual_seed(0)
    scores = _channels_last(1, 21, 16, 16, dtype=torch.bfloat16)
    expected = F.interpolate(scores.float(), size=(64, 64), mode="bilinear", align_corners=False)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fast = upsample_scores(scores, (64, 64))
    # The native kernel runs outside PyTorch's operators; the two passes' width pass is a matrix product.
    assert (counter.get_total_flops() > 0) == (kernel == "two-pass")
    assert fast.dtype == torch.float32 and fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=1e-6)
    # no_grad (FLOP counting, plain evaluation) sees F.interpolate, which is not counted
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        torch.testing.assert_close(upsample_scores(scores, (64, 64)), expected, rtol=1e-6, atol=1e-6)
    assert counter.get_total_flops() == 0
    trained = scores.float().requires_grad_()
    upsample_scores(trained, (64, 64)).sum().backward()
    assert trained.grad is not None
    # Other sizes: the native kernel takes any, the two passes fall back to F.interpolate
    for size in ((50, 70), (9, 5)):
        with torch.inference_mode():
            torch.testing.assert_close(upsample_scores(scores, size), F.interpolate(
                scores.float(), size=size, mode="bilinear", align_corners=False), rtol=1e-6, atol=1e-6)


def _training_route_of(scores: torch.Tensor, size: tuple[int, int], grad: torch.Tensor) -> tuple[str, torch.Tensor,
                                                                                                  torch.Tensor]:
    leaf = scores.detach().requires_grad_()
    out = upsample_scores(leaf, size)
    out.backward(grad)
    return type(out.grad_fn).__name__, out, leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(64, 64), (50, 70), (9, 5)])
def test_upsample_scores_in_cpu_training_takes_the_native_kernel_both_ways(dtype, size):
    """Forward and gradient as F.interpolate's (float32 sums in another order), for bf16 scores
    too (cast to float32 first, as before); the gradient may come in any layout."""
    from seglab.ops import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    torch.manual_seed(0)
    scores = _channels_last(2, 21, 16, 16, dtype=dtype)
    for grad in (torch.randn(2, *size, 21).permute(0, 3, 1, 2),  # channels-last, as the native cross-entropy's
                 torch.randn(2, 21, *size)):  # NCHW
        name, out, grad_in = _training_route_of(scores, size, grad)
        with native_score_upsampling(False):
            plain_name, plain_out, plain_grad = _training_route_of(scores, size, grad)
        assert name == "_NativeScoreUpsamplingBackward" and plain_name == "UpsampleBilinear2DBackward0"
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, plain_out, rtol=1e-6, atol=1e-6)
        assert grad_in.dtype == dtype and grad_in.shape == scores.shape
        # bf16: the same float32 sums rounded to bf16, where they may land a bf16 step apart
        tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(grad_in.float(), plain_grad.float(), rtol=tolerance, atol=1e-5)


def test_upsample_scores_in_training_leaves_nchw_scores_and_the_switched_off_route_to_f_interpolate():
    from seglab.ops import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    nchw = torch.randn(1, 21, 8, 8, requires_grad=True)
    assert type(upsample_scores(nchw, (32, 32)).grad_fn).__name__ == "UpsampleBilinear2DBackward0"
    scores = _channels_last(1, 21, 8, 8, dtype=torch.float32).requires_grad_()
    with native_score_upsampling(False):
        assert type(upsample_scores(scores, (32, 32)).grad_fn).__name__ == "UpsampleBilinear2DBackward0"
    assert type(upsample_scores(scores, (32, 32)).grad_fn).__name__ == "_NativeScoreUpsamplingBackward"


def _summed_by_operators(out: torch.Tensor, parts: list[torch.Tensor], relu: bool) -> torch.Tensor:
    total = out.double().clone()
    for part in parts:
        total += F.interpolate(part.double(), size=out.shape[-2:], mode="bilinear", align_corners=False)
    return total.relu() if relu else total


# Whole factors (SegFormer's 2, 4, 8), other ratios, a 1 x 1 map, a part larger than the map.
SIZES = [(16, 16), (8, 8), (4, 4), (5, 7), (1, 1), (31, 45), (19, 3)]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels", [256, 21, 3])
def test_add_upsampled_equals_the_operators(relu, channels):
    from seglab.ops import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    torch.manual_seed(0)
    out = _channels_last(2, channels, 32, 24, dtype=torch.float32)
    parts = [_channels_last(2, channels, h, w, dtype=torch.float32) for h, w in SIZES]
    expected = _summed_by_operators(out, parts, relu)
    with torch.no_grad():
        result = add_bilinear_upsampled_(out, parts, relu=relu)
    assert result is out and out.is_contiguous(memory_format=torch.channels_last)
    # float32 sums of 8 terms, and float32 source positions (F.interpolate's own for float32)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    if relu:
        assert (out >= 0).all() and (out == 0).any()


def test_add_upsampled_in_bf16_rounds_once():
    from seglab.ops import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    torch.manual_seed(0)
    out = _channels_last(1, 40, 20, 20, dtype=torch.bfloat16)
    parts = [_channels_last(1, 40, h, h, dtype=torch.bfloat16) for h in (10, 5, 3)]
    expected = _summed_by_operators(out, parts, relu=True)
    with torch.no_grad():
        add_bilinear_upsampled_(out, parts, relu=True)
    # Summed in float32 and rounded once: within half a bf16 step of the exact sum.
    assert ((out.double() - expected).abs() <= expected.abs() * 2.0 ** -8 + 1e-30).all()


def test_add_upsampled_keeps_nan_through_the_relu():
    from seglab.ops import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    out = torch.zeros(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    out[0, 3, 1, 2] = float("nan")
    part = -torch.ones(1, 16, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        add_bilinear_upsampled_(out, [part], relu=True)
    assert torch.isnan(out[0, 3, 1, 2]) and torch.isnan(out).sum() == 1
    assert (out.nan_to_num() == 0).all()


def test_add_upsampled_with_gradients_takes_the_operators():
    torch.manual_seed(0)
    out = _channels_last(1, 8, 12, 12)
    part = _channels_last(1, 8, 3, 3).requires_grad_()
    total = add_bilinear_upsampled_(out.clone(), [part], relu=True)
    total.sum().backward()
    expected = _summed_by_operators(out, [part.detach()], relu=True)
    torch.testing.assert_close(total.detach(), expected)
    # Each input pixel's gradient: the bilinear weights it gave to the outputs the ReLU passed.
    reference = part.detach().clone().requires_grad_()
    (out + F.interpolate(reference, size=(12, 12), mode="bilinear", align_corners=False)).relu().sum().backward()
    torch.testing.assert_close(part.grad, reference.grad)


def test_add_upsampled_nchw_map_takes_the_operators():
    torch.manual_seed(0)
    out = torch.randn(2, 5, 9, 9)  # NCHW: the native kernel is for channels-last maps
    parts = [_channels_last(2, 5, 3, 3)]
    expected = _summed_by_operators(out, parts, relu=False)
    torch.testing.assert_close(add_bilinear_upsampled_(out, parts), expected.float())
