"""The training route of CPU convolutions: in float32 Winograd where it pays, elsewhere the
weight gradient by the kernel timed fastest; under bf16 autocast F(2x2) for the wider ones; against
eager PyTorch."""
import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import seglab.engine.convolutions as convolutions
import seglab.engine.winograd as winograd_rule
from seglab.engine.convolutions import TrainingConvolutions, training_convolutions
from seglab.engine.precision import cpu_runs_bf16
from seglab.models import create_model
from seglab.ops import native
from seglab.ops.nearest_conv import NearestUpsampleConv
from seglab.ops.weight_gradient import clear_choices


@pytest.fixture(autouse=True)
def _fresh_choices():
    clear_choices()
    yield
    clear_choices()


def _step(model: nn.Module, x: torch.Tensor, context) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    model.zero_grad()
    with FlopCounterMode(display=False) as flops, context:
        y = model(x)
        y.square().sum().backward()
    return y, [p.grad.clone() for p in model.parameters()], flops.get_total_flops()


def test_training_convolutions_run_winograd_forward_and_backward_in_float32(winograd_transforms):
    torch.manual_seed(0)
    # The last conv: too few output channels for the transforms of PyTorch's operators, direct;
    # enough for the native ones.
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=2, dilation=2),
                          nn.Conv2d(128, 32, 3, padding=1))
    x = torch.randn(4, 128, 32, 32).contiguous(memory_format=torch.channels_last)  # 256 tiles: enough to pay

    route = training_convolutions(model, "cpu", "32", tuned_weight_gradients=False)
    assert isinstance(route, TrainingConvolutions) and len(route.convs) == 3
    assert len(route.winograd_convs) == (3 if winograd_transforms == "native" else 2)
    direct_y, direct_grads, direct_flops = _step(model, x, contextlib.nullcontext())
    y, grads, winograd_flops = _step(model, x, route)
    assert not any("_conv_forward" in vars(m) for m in model)  # the modules as they were outside
    torch.testing.assert_close(y, direct_y, atol=1e-4, rtol=1e-4)
    for grad, expected in zip(grads, direct_grads):
        torch.testing.assert_close(grad, expected, atol=1e-3, rtol=1e-4)
    # Forward and gradients of the Winograd convolutions at about a quarter (the native
    # transforms are not counted), the last conv's (a quarter of the others' products) direct
    # or Winograd.
    assert winograd_flops < 0.5 * direct_flops
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        model(x)
    with torch.autocast("cpu", torch.bfloat16), route, FlopCounterMode(display=False) as under_autocast:
        model(x)
    # Under bf16 autocast the two 128 -> 128 convolutions (1,024 2 x 2 tiles) take F(2x2) with the
    # native transforms, on processors without AMX: 16 products per 4 outputs, 4/9 of the direct
    # multiply-adds. The 128 -> 32 one stays direct.
    wide = 2 * 4 * 32 * 32 * 128 * 128 * 9
    f2x2 = native.available() and not winograd_rule._has_amx()
    assert under_autocast.get_total_flops() == forward.get_total_flops() - (2 * wide - 2 * wide * 4 // 9) * f2x2
    if cpu_runs_bf16():
        assert not training_convolutions(model, "cpu", "bf16").tuned_weight_gradients  # float32's
        assert isinstance(training_convolutions(model, "cpu", "bf16", winograd=False), contextlib.nullcontext)
    assert isinstance(training_convolutions(model, "cpu", "32", enabled=False), contextlib.nullcontext)


def test_bf16_autocast_trains_the_widest_convolutions_by_f2x2_near_autocasts_own(monkeypatch):
    from seglab.ops import native

    if not native.available():
        pytest.skip(f"the native kernels are not available: {native.unavailable_reason()}")
    monkeypatch.setattr("seglab.engine.winograd._has_amx", lambda: False)  # the rule measured (on any CPU)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=2, dilation=2),
                          nn.Conv2d(256, 64, 3, padding=1))  # the last: too few channels, autocast's
    x = torch.randn(2, 256, 32, 32).contiguous(memory_format=torch.channels_last)  # 512 tiles
    route = TrainingConvolutions(model, tuned_weight_gradients=False)

    def step(context) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        with torch.autocast("cpu", torch.bfloat16):
            return _step(model, x, context)

    direct_y, direct_grads, direct_flops = step(contextlib.nullcontext())
    y, grads, flops = step(route)
    assert y.dtype == direct_y.dtype == torch.bfloat16
    reference_y, reference_grads, _ = _step(model.double(), x.double(), contextlib.nullcontext())
    model.float()
    # Within 3x the error of autocast's direct convolutions (measured 1.4-2x on a single one).
    for ours, direct, reference in zip([y] + grads, [direct_y] + direct_grads, [reference_y] + reference_grads):
        assert ours.dtype == direct.dtype
        error, direct_error = ((t.double() - reference).abs().max() for t in (ours, direct))
        assert error < 3 * direct_error
    # The two wide convolutions' products: 16 per 2 x 2 outputs instead of 36, in the forward and
    # the gradients (5 passes: the first's input needs none). The filters' transform and its
    # gradient run natively (`native.winograd_filters`), outside the counter's operators.
    direct = 2 * 256 * 256 * 9 * 2 * 32 * 32
    assert direct_flops - flops == pytest.approx(5 * direct * (36 - 16) / 36, rel=1e-6)


def test_the_fpn_stride4_head_convolutions_take_the_route(monkeypatch):
    # FPN-R18 computes its stride-4 head from C2 and P3 with kernels derived from its parameters
    # (a 3x3 kernel composed with the lateral, a transposed one for the upsampled P3); both
    # convolutions go through calls the route replaces, so they train by the tuned kernels too.
    torch.manual_seed(0)
    model = create_model("fpn", num_classes=3, encoder="resnet18").train().to(memory_format=torch.channels_last)
    assert model.compose_stride4
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    weights = []
    real = convolutions.tuned_convolution

    def recorded(input, weight, bias, settings, timed):
        weights.append((tuple(weight.shape), settings.transposed))
        return real(input, weight, bias, settings, timed)

    monkeypatch.setattr(convolutions, "tuned_convolution", recorded)
    route = training_convolutions(model, "cpu", "32")
    assert model in route.upsampling_convs
    torch.manual_seed(1)  # the same dropout mask in both steps
    expected_y, expected_grads, _ = _step(model, x, contextlib.nullcontext())
    torch.manual_seed(1)
    y, grads, _ = _step(model, x, route)
    torch.testing.assert_close(y, expected_y, atol=1e-5, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads):
        # Sums of thousands of terms in another order: float32 rounding of the largest entries.
        torch.testing.assert_close(grad, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4)
    head = model.heads[0].convs[0][0]
    assert ((head.out_channels, 64, 3, 3), False) in weights  # the composed kernel reads C2's 64 channels
    assert ((head.in_channels, head.out_channels, 4, 4), True) in weights  # P3's upsampled share
    assert not any({"_conv_forward", "_upsampling_conv"} & set(vars(m)) for m in model.modules())


def test_the_other_convolutions_train_with_their_weight_gradient_by_the_tuned_kernel(monkeypatch):
    torch.manual_seed(0)
    # A U-Net decoder: its first convolution of each step a NearestUpsampleConv (a transposed 4x4
    # convolution for the upsampled part, a 3x3 one for the skip); a ResNet-18 with its strided
    # convolutions, 1x1 shortcuts and stem. At 64 x 64 no convolution takes Winograd.
    model = create_model("unet", num_classes=3, encoder="resnet18").train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    calls, timings = [], []
    real = convolutions.tuned_convolution

    def recorded(input, weight, bias, settings, timed):
        calls.append(settings)
        timings.append(timed)
        return real(input, weight, bias, settings, timed)

    monkeypatch.setattr(convolutions, "tuned_convolution", recorded)
    route = training_convolutions(model, "cpu", "32")
    upsampling = [m for m in model.modules() if isinstance(m, NearestUpsampleConv)]
    assert upsampling and all(m in route.upsampling_convs for m in upsampling)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(route.convs) == len(convs)  # every Conv2d of this model computes by `_conv_forward`

    expected_y, expected_grads, _ = _step(model, x, contextlib.nullcontext())
    assert calls == []
    y, grads, _ = _step(model, x, route)
    torch.testing.assert_close(y, expected_y, atol=0, rtol=0)  # the same forward kernels
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-4)
    assert sum(s.transposed for s in calls) == len(upsampling)
    assert {s.stride for s in calls} == {(1, 1), (2, 2)} and all(timings)
    # One call per convolution: the plain ones, each upsampling step's transposed part and its
    # skip's share (the last step, to the full resolution, has no skip).
    plain = len(convs) - len(upsampling)
    assert len(calls) == plain + len(upsampling) + len(upsampling) - 1
    assert not any({"_conv_forward", "_upsampling_conv"} & set(vars(m)) for m in model.modules())

    # Without gradients, under autocast, or when asked not to: the plain convolutions.
    calls.clear()
    with torch.no_grad(), route:
        model(x)
    with torch.autocast("cpu", torch.bfloat16), route:
        model(x).float().sum().backward()
    _step(model, x, training_convolutions(model, "cpu", "32", tuned_weight_gradients=False))
    assert calls == []

    # Deterministic: the same calls, none of them timed.
    timings.clear()
    _step(model, x, training_convolutions(model, "cpu", "32", deterministic=True))
    assert len(timings) == plain + 2 * len(upsampling) - 1 and not any(timings)


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
def test_a_wide_decoder_step_trains_on_the_upsampled_grid_and_the_module_gets_its_rule_back(monkeypatch):
    import seglab.ops.nearest_conv as nearest_conv

    torch.manual_seed(0)
    conv = NearestUpsampleConv(128 + 64, 128).to(memory_format=torch.channels_last)
    x = torch.randn(4, 128, 16, 16).contiguous(memory_format=torch.channels_last)  # 4 x 8 x 8 output tiles
    skip = torch.randn(4, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    tiles, real = [], nearest_conv.winograd_conv3x3_of_nearest2x

    def recorded(x, skip, filters, bias):
        tiles.append(math.isqrt(filters.shape[0]) - 2)
        return real(x, skip, filters, bias)

    monkeypatch.setattr(nearest_conv, "winograd_conv3x3_of_nearest2x", recorded)

    def step(context):
        conv.zero_grad()
        inputs = [t.detach().requires_grad_() for t in (x, skip)]
        with context:
            y = conv(*inputs)
        y.square().sum().backward()
        return [y] + [t.grad for t in inputs] + [p.grad.clone() for p in conv.parameters()]

    expected = step(contextlib.nullcontext())
    assert tiles == []
    before = lambda x, weight: None  # noqa: E731 (a rule set earlier, e.g. by the inference path)
    conv.winograd_tile = before
    got = step(training_convolutions(conv, "cpu", "32"))
    assert tiles == [4]  # F(4x4) on 32 x 32
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, atol=2e-5 * theirs.abs().max().item(), rtol=1e-4)
    assert conv.winograd_tile is before
    # Under autocast the transposed convolution.
    with torch.autocast("cpu", torch.bfloat16), TrainingConvolutions(conv, tuned_weight_gradients=False):
        conv(x, skip)
    assert tiles == [4]


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
def test_the_fpn_stride4_head_trains_on_the_upsampled_grid_where_it_pays(monkeypatch):
    # FPN-R18's stride-4 head reads up(P3) (256 channels) and C2 (64, through the kernel composed
    # with the lateral) into 128: at 128 x 128, batch 2, 128 F(4x4) tiles, enough to train by
    # Winograd on the stride-4 grid, one convolution over both.
    import seglab.ops.nearest_conv as nearest_conv

    torch.manual_seed(0)
    model = create_model("fpn", num_classes=3, encoder="resnet18").train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    shapes, real = [], nearest_conv.winograd_conv3x3_of_nearest2x

    def recorded(x, skip, filters, bias):
        shapes.append((x.shape[1], skip.shape[1], tuple(filters.shape)))
        return real(x, skip, filters, bias)

    monkeypatch.setattr(nearest_conv, "winograd_conv3x3_of_nearest2x", recorded)
    route = training_convolutions(model, "cpu", "32")
    assert model in route.doubling_convs
    torch.manual_seed(1)  # the same dropout mask in both steps
    expected_y, expected_grads, _ = _step(model, x, contextlib.nullcontext())
    assert shapes == []
    torch.manual_seed(1)
    y, grads, _ = _step(model, x, route)
    assert shapes == [(256, 64, (36, 256 + 64, 128))]
    torch.testing.assert_close(y, expected_y, atol=1e-4, rtol=1e-4)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, atol=2e-5 * expected.abs().max().item(), rtol=1e-4)
    assert "winograd_tile" not in vars(model)


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
@pytest.mark.parametrize("dilation, tile", [(12, 6), (24, 3), (36, None)])
def test_a_large_dilation_trains_by_winograd_on_its_phases_where_that_saves_most(monkeypatch, dilation, tile):
    """DeepLab's ASPP branches on a 64 x 64 map: at dilation 12 each phase is one 6 x 6 tile,
    at 24 one 3 x 3 tile (`atrous_output_tile`); at 36 the per-tap windows keep it. Values and
    gradients as the plain convolution's; outside the route, and under autocast, the module's
    own routes."""
    import seglab.ops.atrous_gemm as atrous_gemm
    from seglab.ops.atrous_gemm import AtrousConv2d

    torch.manual_seed(0)
    conv = AtrousConv2d(64, 64, 3, dilation=dilation).to(memory_format=torch.channels_last)
    x = torch.randn(1, 64, 64, 64).contiguous(memory_format=torch.channels_last)
    sides, real = [], atrous_gemm.winograd_conv3x3

    def recorded(x, filters, *args):
        sides.append(math.isqrt(filters.shape[0]) - 2)
        return real(x, filters, *args)

    monkeypatch.setattr(atrous_gemm, "winograd_conv3x3", recorded)

    def step(context):
        conv.zero_grad()
        inputs = x.detach().requires_grad_()
        with context:
            y = conv(inputs)
        y.square().sum().backward()
        return [y, inputs.grad] + [p.grad.clone() for p in conv.parameters()]

    expected = step(contextlib.nullcontext())
    assert sides == []
    reference = nn.Conv2d(64, 64, 3, padding=dilation, dilation=dilation)
    reference.load_state_dict(conv.state_dict())
    torch.testing.assert_close(expected[0], reference(x), atol=1e-5, rtol=1e-5)
    got = step(training_convolutions(conv, "cpu", "32", tuned_weight_gradients=False))
    assert sides == ([] if tile is None else [tile])
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, atol=2e-5 * theirs.abs().max().item(), rtol=1e-4)
    assert "winograd_tile" not in vars(conv) and AtrousConv2d.winograd_tile is None
    assert not TrainingConvolutions(conv, winograd=False).atrous_convs
    with torch.autocast("cpu", torch.bfloat16), TrainingConvolutions(conv, tuned_weight_gradients=False):
        conv(x.detach().requires_grad_())
    assert sides == ([] if tile is None else [tile])


def test_int8_products_take_the_large_1x1_convolutions_of_a_training_step_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 512, 1), nn.ReLU(), nn.Conv2d(512, 64, 1), nn.ReLU(),
                          nn.Conv2d(64, 8, 1)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 256, 16, 16).contiguous(memory_format=torch.channels_last)
    taken = []
    real = convolutions.int8_pointwise_conv
    int8_route = TrainingConvolutions(model, int8_products=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convolutions, "int8_pointwise_conv",
                      lambda x, w, b, stride: taken.append(tuple(w.shape)) or real(x, w, b, stride))
        y, gradients, _ = _step(model, x, int8_route)
        with torch.no_grad(), int8_route:
            inferred = model(x)
    assert taken == [(512, 256, 1, 1)]  # 512 x 64 is too few channel pairs; none without gradients
    exact, exact_gradients, _ = _step(model, x, TrainingConvolutions(model))
    assert torch.equal(inferred, model(x))
    assert 1e-6 < float((y - exact).detach().norm() / exact.detach().norm()) < 0.01
    # The rounding of the first forward reaches every gradient through the loss, most the first
    # weight's (its input is what was rounded): direction kept, size within 10%.
    for gradient, exact_gradient in zip(gradients, exact_gradients):
        assert torch.cosine_similarity(gradient.flatten(), exact_gradient.flatten(), 0) > 0.99
        assert float((gradient - exact_gradient).norm() / exact_gradient.norm()) < 0.1


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
@pytest.mark.parametrize("dilation, weight_tile", [(12, 6), (24, 3), (36, None)])
def test_int8_products_take_the_atrous_windows_with_winograds_weight_gradient_where_it_saves(
        monkeypatch, dilation, weight_tile):
    """With int8 products the ASPP's branches on a 64 x 64 map run as int8 windows, their weight
    gradient by the Winograd tile the float32 route would take (6 x 6 at dilation 12, 3 x 3 at
    24, none at 36: the float32 windows); the module's attributes are its own again after."""
    import seglab.ops.atrous_gemm as atrous_gemm
    from seglab.ops.atrous_gemm import AtrousConv2d

    taken = []
    winograd, windows = atrous_gemm.winograd_conv3x3, atrous_gemm.windowed_gemm_conv
    monkeypatch.setattr(atrous_gemm, "winograd_conv3x3", lambda *a: taken.append("winograd") or winograd(*a))
    monkeypatch.setattr(atrous_gemm, "windowed_gemm_conv", lambda *a, **options: taken.append(options) or windows(*a, **options))
    torch.manual_seed(0)
    conv = AtrousConv2d(256, 256, 3, dilation=dilation).to(memory_format=torch.channels_last)
    x = torch.randn(1, 256, 64, 64).relu().contiguous(memory_format=torch.channels_last)
    with TrainingConvolutions(conv, tuned_weight_gradients=False, int8_products=True):
        y = conv(x.requires_grad_())
    assert taken == [dict(int8=True, weight_tile=weight_tile)]
    assert "int8_windows" not in vars(conv) and "winograd_tile" not in vars(conv)
    conv(x)
    assert taken[1:] == [{}]  # outside the route the module's own: float32 windows (share <= 0.77)
    upstream = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, conv.weight], upstream)
    exact = F.conv2d(x, conv.weight, conv.bias, padding=dilation, dilation=dilation)
    expected = torch.autograd.grad(exact, [x, conv.weight], upstream)
    errors = [float((a - e).norm() / e.norm()) for a, e in zip([y.detach(), *got], [exact.detach(), *expected])]
    # the forward and the input gradient rounded to int8 levels, the weight gradient float32's
    assert 1e-4 < errors[0] < 0.015 and 1e-4 < errors[1] < 0.015 and errors[2] < 1e-4


def test_int8_products_are_float32_only():
    model = nn.Sequential(nn.Conv2d(8, 8, 1))
    route = training_convolutions(model, "cpu", "32", int8_products=True)
    assert isinstance(route, TrainingConvolutions) and route.int8_products
    assert not training_convolutions(model, "cpu", "32").int8_products
