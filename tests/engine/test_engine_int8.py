"""int8 inference: the quantization's arithmetic, one convolution against float32, a whole model
through `optimize_for_inference(precision="int8")`, and the refusals."""
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.engine import int8 as int8_module
from seglab.engine.fastpath import optimize_for_inference, to_channels_last
from seglab.engine.int8 import (
    INT8_WEIGHT_LEVELS,
    Int8Convolution,
    Int8UpsamplingConvolution,
    calibrate_int8,
    cpu_runs_int8,
    input_quantization,
    quantize_weights,
)
from seglab.engine.onednn import FusedConv
from seglab.models import create_model
from seglab.ops.nearest_conv import NearestUpsampleConv

needs_int8 = pytest.mark.skipif(not cpu_runs_int8(), reason="this CPU has no VNNI or AMX 8-bit products")


def test_input_quantization_of_a_non_negative_range_has_zero_point_0():
    scale, zero_point = input_quantization(0.0, 5.1)
    assert zero_point == 0 and scale == pytest.approx(5.1 / 255)


def test_input_quantization_of_a_signed_range_puts_zero_on_a_level():
    scale, zero_point = input_quantization(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255)
    assert zero_point == round(1.0 / scale)  # zero is exactly representable, so zero padding is exact
    assert input_quantization(0.5, 2.0)[0] == pytest.approx(2.0 / 255)  # widened to hold 0


def test_input_quantization_of_an_all_zero_input_is_usable():
    assert input_quantization(0.0, 0.0) == (1.0, 0)


def test_quantize_weights_per_output_channel_within_half_a_level():
    weight = torch.randn(6, 4, 3, 3) * torch.tensor([1e-3, 1.0, 10.0, 0.1, 2.0, 5.0]).view(-1, 1, 1, 1)
    weight[3] = 0.0
    levels, scales = quantize_weights(weight)
    assert levels.dtype == torch.int8 and levels.is_contiguous(memory_format=torch.channels_last)
    assert int(levels.abs().max()) == INT8_WEIGHT_LEVELS  # each non-zero channel uses the whole range
    assert torch.all(levels[3] == 0) and scales[3] == 1.0
    restored = levels.float() * scales.view(-1, 1, 1, 1)
    assert torch.all((restored - weight).abs() <= scales.view(-1, 1, 1, 1) / 2 + 1e-12)


def _fused(in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, dilation: int = 1,
           relu: bool = True) -> FusedConv:
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, dilation * (kernel // 2), dilation).eval()
    conv.requires_grad_(False)
    return FusedConv(conv, nn.ReLU() if relu else None, prepack=True)


def _relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result - reference).abs().max() / reference.abs().max())


@needs_int8
@pytest.mark.parametrize("kernel, stride, dilation, relu", [(1, 1, 1, True), (3, 1, 1, True), (3, 2, 1, False),
                                                            (3, 1, 6, True), (7, 2, 1, False)])
def test_int8_convolution_matches_float32_within_quantization(kernel, stride, dilation, relu):
    conv = _fused(32, 24, kernel, stride=stride, dilation=dilation, relu=relu)
    x = to_channels_last(torch.randn(2, 32, 20, 20))  # signed input: a non-zero zero point
    with torch.inference_mode():
        reference = conv(x)
        conv.int8 = Int8Convolution(conv, float(x.min()), float(x.max()))
        result = conv(x)
    assert result.dtype == torch.float32 and result.shape == reference.shape
    # 8-bit inputs and weights: about 1% of the largest output, far from float32's rounding
    assert 1e-5 < _relative_error(result, reference) < 0.03
    if relu:
        assert float(result.min()) >= 0.0


@needs_int8
def test_int8_convolution_adds_the_residual_before_the_relu():
    conv = _fused(16, 16, 3)
    x, shortcut = to_channels_last(torch.rand(1, 16, 12, 12)), to_channels_last(torch.randn(1, 16, 12, 12))
    with torch.inference_mode():
        reference = conv(x, shortcut)
        conv.int8 = Int8Convolution(conv, 0.0, float(x.max()))
        result = conv(x, shortcut)
    assert _relative_error(result, reference) < 0.03
    assert float(result.min()) == 0.0  # the ReLU came after the addition of a signed shortcut


@needs_int8
def test_int8_inputs_beyond_the_calibrated_range_saturate():
    conv = _fused(8, 8, 1, relu=False)
    x = to_channels_last(torch.rand(1, 8, 4, 4))
    with torch.inference_mode():
        conv.int8 = Int8Convolution(conv, 0.0, 1.0)
        assert torch.allclose(conv(x * 0 + 3.0), conv(x * 0 + 1.0))  # 3 clips to the largest level, 1


class _DecoderStep(nn.Module):
    """A U-Net decoder step's convolution, given its skip at every call."""

    def __init__(self, skip: torch.Tensor) -> None:
        super().__init__()
        self.conv = NearestUpsampleConv(6 + skip.shape[1], 5, 3, padding=1).eval().requires_grad_(False)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.skip)


@needs_int8
def test_a_decoder_steps_range_covers_its_skip_and_its_int8_form_upsamples_the_levels():
    torch.manual_seed(0)
    x = to_channels_last(torch.rand(1, 6, 5, 7))
    step = _DecoderStep(to_channels_last(torch.rand(1, 3, 10, 14) * 4 - 1))  # the wider range, and signed
    ranges = calibrate_int8(step, [x])
    assert ranges == {"conv": (float(step.skip.min()), float(step.skip.max()))}
    with torch.inference_mode():
        upsampled = F.interpolate(x, scale_factor=2.0, mode="nearest")
        reference = F.conv2d(torch.cat([upsampled, step.skip], 1), step.conv.weight, step.conv.bias, padding=1)
        step.conv.int8 = Int8UpsamplingConvolution(step.conv, *ranges["conv"])
        assert _relative_error(step(x), reference) < 0.03
        alone = NearestUpsampleConv(6, 5, 3, padding=1).eval().requires_grad_(False)
        alone.int8 = Int8UpsamplingConvolution(alone, 0.0, 1.0)  # no skip: x upsampled to the size asked
        assert alone(x, size=(11, 15)).shape == (1, 5, 11, 15)


def test_calibrate_int8_records_each_convolutions_input_range():
    conv = _fused(3, 4, 3)
    model = nn.Sequential(conv, nn.Conv2d(4, 4, 3, groups=4))  # a depthwise one is not taken
    batches = [torch.full((1, 3, 8, 8), -2.0), torch.full((1, 3, 8, 8), 5.0)]
    assert calibrate_int8(model, batches) == {"0": (-2.0, 5.0)}
    assert not conv._forward_pre_hooks  # the observers are gone
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_int8(model, [])


def _output(output):
    return output["out"] if isinstance(output, dict) else output


def _small_resnet_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=5, encoder="resnet18").eval()


@needs_int8
@pytest.mark.parametrize("name", ["deeplabv3", "fpn", "unet"])
def test_optimize_for_inference_int8_stays_close_to_float32(name):
    model = _small_resnet_model(name)
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(2, 3, 64, 64, generator=generator) for _ in range(2)]
    images = torch.randn(2, 3, 64, 64, generator=generator)
    fast = optimize_for_inference(model, "32")
    int8 = optimize_for_inference(model, "int8", calibration=calibration)
    taken = [m for m in int8.modules() if isinstance(m, (FusedConv, NearestUpsampleConv)) and m.int8 is not None]
    assert len(taken) >= 20  # the encoder's convolutions and the head's
    decoder_steps = [m for m in int8.modules() if isinstance(m, NearestUpsampleConv)]
    assert all(isinstance(m.int8, Int8UpsamplingConvolution) for m in decoder_steps)
    assert (name == "unet") == bool(decoder_steps)
    assert all(m.int8 is None for m in fast.modules() if isinstance(m, FusedConv))  # the model given is untouched
    reference, result = fast(images), int8(images)
    reference, result = _output(reference), _output(result)
    assert 1e-5 < _relative_error(result, reference) < 0.1
    # a ResNet-18 block's first convolution writes its output as the second one's uint8 levels
    chained = [m for m in taken if isinstance(m, FusedConv) and m.int8.output_levels is not None]
    assert len(chained) >= 8
    for conv in chained:
        conv.int8.output_levels = None
    assert torch.equal(result, _output(int8(images)))  # the same rounding of the same values


def test_int8_needs_calibration_and_refuses_compile():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with mock.patch.object(int8_module, "cpu_runs_int8", return_value=True):
        with pytest.raises(ValueError, match="calibration"):
            optimize_for_inference(model, "int8")
        with pytest.raises(ValueError, match="compile"):
            optimize_for_inference(model, "int8", calibration=[torch.zeros(1, 3, 8, 8)], compile=True)


def test_int8_is_refused_without_8_bit_products():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with mock.patch.object(int8_module, "cpu_runs_int8", return_value=False):
        with pytest.raises(ValueError, match="VNNI or AMX"):
            optimize_for_inference(model, "int8", calibration=[torch.zeros(1, 3, 8, 8)])


@needs_int8
def test_int8_leaves_float32_inputs_of_another_dtype_and_gradients_alone():
    conv = _fused(4, 4, 3)
    x = to_channels_last(torch.rand(1, 4, 8, 8))
    with torch.inference_mode():
        conv.int8 = Int8Convolution(conv, 0.0, 1.0)
    with torch.enable_grad():  # a weight that records gradients trains: plain float32 convolution
        conv.weight.requires_grad_(True)
        expected = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
        assert torch.allclose(conv(x), expected, atol=1e-6)


@pytest.mark.parametrize("native_built", [True, False])
def test_quantize_input_gives_the_same_levels_natively_and_in_pytorch(native_built):
    if native_built and not int8_module.native.available():
        pytest.skip("the native kernels are not built here")
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last) * 3
    expected = (torch.round(x / 0.05) + 60).clamp(0, 255).to(torch.uint8)
    with mock.patch.object(int8_module.native, "available", return_value=native_built):
        levels = int8_module.quantize_input(x, 0.05, 60)
    assert levels.is_contiguous(memory_format=torch.channels_last)
    # x / s and x * (1 / s) may round a value that lies within float32's rounding of a half apart
    assert int((levels.int() - expected.int()).abs().max()) <= 1 and (levels != expected).float().mean() < 1e-3


def _residual_wiring(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = net.a(x)
    return net.c(net.b(y), y)  # a's output is b's input and c's residual


def _two_readers_wiring(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = net.a(x)
    return net.b(y) + net.c(y)  # a's output is the input of two convolutions


class _ThreeConvolutions(nn.Module):
    def __init__(self, wiring) -> None:
        super().__init__()
        self.a, self.b, self.c = _fused(4, 4, 3), _fused(4, 4, 3), _fused(4, 4, 3)
        self.wiring = wiring

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wiring(self, x)


# a's levels would reach c's float addition; one scale cannot serve two readers
@pytest.mark.parametrize("wiring, pairs", [(_residual_wiring, [("b", "c")]), (_two_readers_wiring, [])])
def test_only_an_output_one_convolution_alone_reads_is_chained(wiring, pairs):
    from seglab.engine.fastpath import _conv_consumer_pairs

    assert _conv_consumer_pairs(_ThreeConvolutions(wiring), (FusedConv,), torch.rand(1, 4, 8, 8)) == pairs
