"""The upsampling family: one interface, exact output sizes, and each kind's defining property."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import seglab
from seglab.engine.fastpath import optimize_for_inference
from seglab.ops.upsample import UPSAMPLE_KINDS, bilinear_kernel, make_upsample


@pytest.mark.parametrize("kind", [k for k in UPSAMPLE_KINDS if k != "max_unpool"])
@pytest.mark.parametrize("scale", [2, 4])
def test_every_kind_scales_and_hits_a_requested_size(kind, scale):
    up = make_upsample(kind, 4, 6, scale)
    x = torch.rand(2, 4, 5, 7)
    assert up(x).shape == (2, 6, 5 * scale, 7 * scale)
    # A decoder asks for its skip's size, which is one pixel short for odd images.
    assert up(x, size=(5 * scale - 1, 7 * scale - 1)).shape == (2, 6, 5 * scale - 1, 7 * scale - 1)


def test_bed_of_nails_puts_each_value_in_the_top_left_corner():
    x = torch.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    y = make_upsample("bed_of_nails", 1, 1, 2)(x)
    expected = torch.tensor([[1.0, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]])
    assert torch.equal(y[0, 0], expected)


def test_nearest_repeats_values():
    x = torch.rand(1, 2, 3, 3)
    y = make_upsample("nearest", 2, 2, 2)(x)
    assert torch.equal(y[..., ::2, ::2], x) and torch.equal(y[..., 1::2, 1::2], x)


@pytest.mark.parametrize("scale", [2, 3, 8])
def test_transposed_conv_starts_as_bilinear_interpolation(scale):
    up = make_upsample("transposed", 3, 3, scale)
    x = torch.rand(1, 3, 6, 6)
    reference = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    margin = scale  # the borders differ: the transposed conv sees zeros beyond the image
    torch.testing.assert_close(up(x)[..., margin:-margin, margin:-margin], reference[..., margin:-margin, margin:-margin])
    assert up.conv.weight.requires_grad


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_fixed_bilinear_transposed_conv_is_computed_as_interpolation_with_the_same_interior(layout):
    """Frozen and still the bilinear kernel (FCN's final layer): interpolation, whose values
    and input gradient agree with the convolution's away from the s/2-pixel borders."""
    scale, margin = 8, 4
    up = make_upsample("transposed", 3, 3, scale)
    up.fixed = True  # as FCN marks its final layer
    x = torch.rand(2, 3, 7, 9).contiguous(memory_format=layout)
    grad = torch.rand(2, 3, 7 * scale, 9 * scale)
    grad[..., :margin + scale, :] = 0  # only interior pixels' gradients: each reads inputs the two ways agree on
    grad[..., -(margin + scale):, :] = 0
    grad[..., :, :margin + scale] = 0
    grad[..., :, -(margin + scale):] = 0
    results = {}
    for frozen in (False, True):
        up.requires_grad_(not frozen)
        assert up.is_fixed_bilinear() == frozen
        leaf = x.detach().clone().requires_grad_()
        out = up(leaf)
        out.backward(grad)
        results[frozen] = (out.detach(), leaf.grad)
    (conv, conv_grad), (interpolated, interpolated_grad) = results[False], results[True]
    inner = (..., slice(margin, -margin), slice(margin, -margin))
    torch.testing.assert_close(interpolated[inner], conv[inner], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(interpolated, conv)  # the borders: edge values against a fade to zero
    torch.testing.assert_close(interpolated_grad, conv_grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a filter that is no longer bilinear (e.g. a learnt one, loaded) runs as the convolution
        up.conv.weight[0, 0, 3, 3] += 0.5
    assert not up.is_fixed_bilinear()
    torch.testing.assert_close(up(x), F.conv_transpose2d(x, up.conv.weight, stride=scale, padding=margin))


def test_only_a_layer_marked_fixed_is_interpolation_once_frozen_and_in_the_weights_dtype():
    # The fast path and EMA freeze every weight: a learnt layer still at its bilinear
    # initialisation stays a transposed convolution. bf16 weights (the bf16 fast path casts
    # them) are compared with the kernel rounded to bf16, which is not the float32 kernel.
    up = make_upsample("transposed", 3, 3, 16).requires_grad_(False)  # FCN-16s' final layer
    assert not up.is_fixed_bilinear()
    up.fixed = True
    assert up.is_fixed_bilinear()
    up.to(torch.bfloat16)
    assert not torch.equal(up.conv.weight.float(), bilinear_kernel(3, 3, 32))  # taps k/32: products need 10 bits
    assert up.is_fixed_bilinear()


def test_fcns_fast_path_keeps_the_eager_networks_values_in_float32_and_bf16():
    # Untrained FCN-16s: its learnt 2x layer still holds the bilinear kernel; the bf16 fast path
    # casts the fixed final layer's weight. Both had left the eager network (off by 0.44 and
    # 0.73 of the largest logit), at the borders of these small maps.
    model = seglab.create_model("fcn16s", num_classes=3, width=0.125).eval()
    image = torch.rand(2, 3, 64, 64)
    for precision in ("32", "bf16"):
        fast = optimize_for_inference(copy.deepcopy(model), precision=precision)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            expected, got = model(image).float(), fast(image).float()
        assert fast.model.final_up.is_fixed_bilinear() and not fast.model.skip_ups["pool16"].is_fixed_bilinear()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 if precision == "32" else 2e-3)


def test_bilinear_kernel_is_separable_and_peaks_at_one():
    kernel = bilinear_kernel(2, 2, 4)
    assert kernel[0, 1].abs().sum() == 0  # channels do not mix
    assert torch.isclose(kernel[0, 0].max(), torch.tensor(0.5625))  # 0.75 * 0.75 for k=4
    torch.testing.assert_close(kernel[1, 1], kernel[1, 1].T)


def test_transposed_kernel_option_reproduces_the_stride2_kernel3_layout():
    up = make_upsample("transposed", 2, 2, 2, kernel_size=3)
    assert up.conv.kernel_size == (3, 3)
    assert up(torch.rand(1, 2, 5, 5)).shape == (1, 2, 10, 10)


def test_max_unpool_puts_values_back_where_the_maxima_were():
    x = torch.rand(2, 3, 9, 11)
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    y = make_upsample("max_unpool", 3, 3, 2)(pooled, size=x.shape[-2:], indices=indices)
    assert y.shape == x.shape
    kept = y != 0
    assert kept.sum() == pooled.numel()
    assert torch.equal(y[kept], x[kept])
    assert torch.equal(y, F.max_unpool2d(pooled, indices, 2, 2, output_size=x.shape[-2:]))
    with pytest.raises(ValueError, match="indices"):
        make_upsample("max_unpool", 3, 3, 2)(pooled)


def test_pixel_shuffle_rearranges_channels_into_space():
    up = make_upsample("pixel_shuffle", 2, 3, 2)
    assert up.conv.out_channels == 3 * 4
    assert up(torch.rand(1, 2, 4, 4)).shape == (1, 3, 8, 8)


def test_fixed_kinds_project_channels_only_when_they_change():
    assert sum(p.numel() for p in make_upsample("bilinear", 8, 8, 2).parameters()) == 0
    assert sum(p.numel() for p in make_upsample("bilinear", 8, 4, 2).parameters()) == 8 * 4 + 4


def test_bad_kind_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="wavelet"):
        make_upsample("wavelet", 2, 2, 2)
    with pytest.raises(ValueError, match="kernel_size"):
        make_upsample("nearest", 2, 2, 2, kernel_size=3)
    with pytest.raises(ValueError, match="scale"):
        make_upsample("nearest", 2, 2, 0)
