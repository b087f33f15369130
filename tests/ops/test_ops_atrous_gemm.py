"""The dense dilated convolution as per-tap matrix products, against F.conv2d: values,
gradients, autocast, when the module takes that route, and the fast path's view of it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradient_checks import assert_values_and_gradients_equal, gradients

from seglab.ops import native
from seglab.ops.atrous_gemm import AtrousConv2d, shifted_gemm_conv, windowed_gemm_conv


LAYOUTS = [shifted_gemm_conv, windowed_gemm_conv]


@pytest.mark.parametrize("conv", LAYOUTS)
@pytest.mark.parametrize("dilation", [(1, 1), (6, 6), (2, 5), (30, 30)])  # 30: only the centre tap inside
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_convolution(conv, dilation, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 13, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    ours = conv(x, weight, b, dilation)
    expected = F.conv2d(x, weight, b, padding=dilation, dilation=dilation)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert_values_and_gradients_equal(ours, expected, [x, weight] + ([b] if bias else []))


@pytest.mark.parametrize("conv", LAYOUTS)
def test_five_by_five_kernel(conv):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 11, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = F.conv2d(x, weight, padding=(4, 6), dilation=(2, 3))
    torch.testing.assert_close(conv(x, weight, None, (2, 3)), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("wanted", ["input", "weight"])
def test_windows_compute_only_the_gradients_asked_for(wanted):
    """A first layer's input needs no gradient, a frozen layer's weight none: each alone is right."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 10, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    leaf = (x if wanted == "input" else weight).requires_grad_()
    upstream = torch.randn(3, 4, 10, 7, dtype=torch.float64)
    ours = torch.autograd.grad(windowed_gemm_conv(x, weight, None, (4, 3)), leaf, upstream)[0]
    expected = torch.autograd.grad(F.conv2d(x, weight, padding=(4, 3), dilation=(4, 3)), leaf, upstream)[0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_windows_take_a_gradient_in_any_layout():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(3, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, 9, 9, dtype=torch.float64)  # NCHW, as a plain loss's gradient may be
    ours = torch.autograd.grad(windowed_gemm_conv(x, weight, None, (6, 6)), [x, weight], upstream)
    expected = torch.autograd.grad(F.conv2d(x, weight, padding=6, dilation=6), [x, weight], upstream)
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dilation", [(6, 6), (2, 5), (30, 30)])
@pytest.mark.parametrize("wanted", [("input", "weight", "bias"), ("input",), ("weight",)])
def test_int8_windows_round_the_forward_and_input_gradient_only(dilation, wanted):
    """int8 products with one scale per row: the output and the input's gradient within about 1%
    of the convolution's, the weight's and the bias's gradients the float32 windows' own."""
    torch.manual_seed(0)
    x = torch.randn(2, 48, 9, 13).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(40, 48, 3, 3) / 48 ** 0.5
    bias = torch.randn(40)
    leaves = {"input": x, "weight": weight, "bias": bias}
    for name in wanted:
        leaves[name].requires_grad_()
    upstream = torch.randn(2, 40, 9, 13)
    ours = windowed_gemm_conv(x, weight, bias, dilation, int8=True)
    expected = F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert 1e-4 < float((ours - expected).detach().norm() / expected.detach().norm()) < 0.01
    got = dict(zip(wanted, torch.autograd.grad(ours, [leaves[name] for name in wanted], upstream)))
    float_windows = windowed_gemm_conv(x, weight, bias, dilation)
    exact = dict(zip(wanted, torch.autograd.grad(float_windows, [leaves[name] for name in wanted], upstream)))
    if "input" in got:
        assert 1e-4 < float((got["input"] - exact["input"]).norm() / exact["input"].norm()) < 0.015
    for name in ("weight", "bias"):
        if name in got:
            torch.testing.assert_close(got[name], exact[name], rtol=0, atol=0)


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
def test_int8_windows_take_the_weight_gradient_from_winograd_on_request():
    torch.manual_seed(0)
    x = torch.randn(2, 48, 40, 40).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(32, 48, 3, 3) / 48 ** 0.5).requires_grad_()
    upstream = torch.randn(2, 32, 40, 40)
    plain = torch.autograd.grad(windowed_gemm_conv(x, weight, None, (12, 12), int8=True), [x, weight], upstream)
    tiled = torch.autograd.grad(windowed_gemm_conv(x, weight, None, (12, 12), int8=True, weight_tile=6),
                                [x, weight], upstream)
    assert torch.equal(tiled[0], plain[0])  # the input gradient: the same int8 products
    torch.testing.assert_close(tiled[1], plain[1], rtol=1e-4, atol=1e-4 * plain[1].abs().max().item())


def test_bf16_under_autocast_matches_the_autocast_convolution():
    torch.manual_seed(0)
    conv = AtrousConv2d(32, 8, 3, dilation=12)
    x = torch.randn(2, 32, 20, 20).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        ours = conv(x)
        expected = F.conv2d(x, conv.weight, conv.bias, padding=12, dilation=12)
    assert ours.dtype == torch.bfloat16 and ours.grad_fn.name().startswith("_ShiftedGemmConv")
    torch.testing.assert_close(ours.float(), expected.float(), atol=0.05, rtol=0.02)
    upstream = torch.randn(expected.shape)
    inputs = [x, conv.weight, conv.bias]
    for a, e in zip(gradients(ours, upstream, inputs), gradients(expected, upstream, inputs)):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, atol=0.05 * e.abs().max().item(), rtol=0.05)


def test_module_is_a_conv2d_and_takes_the_products_only_to_train():
    conv = AtrousConv2d(8, 4, 3, dilation=6)
    plain = nn.Conv2d(8, 4, 3, padding=6, dilation=6)
    assert conv.padding == (6, 6) and list(conv.state_dict()) == list(plain.state_dict())
    x = torch.randn(1, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    assert conv(x).grad_fn.name().startswith("_WindowedGemmConv")  # float32, share 0.56: per-tap windows
    wide = torch.randn(1, 8, 64, 64).contiguous(memory_format=torch.channels_last)
    assert conv(wide).grad_fn.name().startswith("_ShiftedGemmConv")  # share 0.88: one product for all taps
    assert conv(x.contiguous()).grad_fn.name().startswith("Convolution")  # NCHW: the plain kernel
    assert AtrousConv2d(8, 4, 3, dilation=2)(x).grad_fn.name().startswith("Convolution")  # small dilation
    with torch.no_grad():
        plain.load_state_dict(conv.state_dict())
        torch.testing.assert_close(conv(x), plain(x))  # inference: the plain convolution


@pytest.mark.parametrize("options", [dict(kernel_size=2), dict(kernel_size=3, stride=2), dict(kernel_size=3, groups=2),
                                     dict(kernel_size=3, padding=1, dilation=6)])
def test_refuses_what_it_does_not_compute(options):
    with pytest.raises(ValueError):
        AtrousConv2d(8, 4, **options)


def test_fast_path_still_rewrites_the_aspp_for_inference():
    from seglab.engine.fastpath import DilatedConvAsGemm, optimize_for_inference
    from seglab.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("deeplabv3", num_classes=3, encoder="resnet18").eval()
    assert sum(isinstance(m, AtrousConv2d) for m in model.modules()) == 3
    fast = optimize_for_inference(model, "32")
    assert sum(isinstance(m, DilatedConvAsGemm) for m in fast.modules()) == 3
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
