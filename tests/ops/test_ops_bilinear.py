"""Bilinear upsampling by a whole factor (width pass as a matrix product, height pass as row
blends) against F.interpolate."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seglab.ops.bilinear import bilinear_upsample_by, whole_scale
from seglab.ops.upsample import upsample_scores


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


def test_upsample_scores_takes_the_fast_route_only_in_inference_mode():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    scores = _channels_last(1, 21, 16, 16, dtype=torch.bfloat16)
    expected = F.interpolate(scores.float(), size=(64, 64), mode="bilinear", align_corners=False)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fast = upsample_scores(scores, (64, 64))
    assert counter.get_total_flops() > 0  # the width pass's matrix product ran
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=1e-6)
    # no_grad (FLOP counting, plain evaluation) and training see F.interpolate, which is not counted
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        torch.testing.assert_close(upsample_scores(scores, (64, 64)), expected, rtol=1e-6, atol=1e-6)
    assert counter.get_total_flops() == 0
    trained = scores.float().requires_grad_()
    upsample_scores(trained, (64, 64)).sum().backward()
    assert trained.grad is not None
    # other sizes fall back to F.interpolate
    with torch.inference_mode():
        torch.testing.assert_close(upsample_scores(scores, (50, 70)),
                                   F.interpolate(scores.float(), size=(50, 70), mode="bilinear", align_corners=False))
