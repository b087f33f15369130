import copy

import pytest
import torch
import torch.nn as nn
from engine_helpers import BF16

from seglab.engine.onednn import FusedConv, onednn_available, prepack_conv_weights

pytestmark = pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")


def _conv(dtype: torch.dtype = torch.float32, **options) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, **options).to(dtype)
    conv.requires_grad_(False)
    return conv


def _channels_last(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_packed_weight_gives_the_plain_convolutions_result(dtype):
    conv = _conv(dtype)
    packed = FusedConv(conv, nn.ReLU(), prepack=True)
    x = _channels_last(2, 16, 20, 24, dtype=dtype)
    with torch.inference_mode():
        expected = torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
        first, again = packed(x), packed(x)
    assert packed._packed.value is not None and packed._packed.value.layout != torch.strided  # oneDNN's own layout
    assert torch.equal(first, expected) and torch.equal(again, expected)
    torch.testing.assert_close(first.float(), torch.relu(conv(x)).float(), atol=1e-5 if dtype == torch.float32 else 0.05, rtol=0.02)


def test_packed_weight_serves_other_shapes_and_follows_weight_changes():
    conv = _conv()
    packed = FusedConv(conv, prepack=True)
    with torch.inference_mode():
        packed(_channels_last(1, 16, 8, 8))  # packed for this shape
        for shape in [(3, 16, 17, 30), (1, 16, 64, 5)]:
            x = _channels_last(*shape)
            torch.testing.assert_close(packed(x), conv(x), atol=1e-5, rtol=1e-5)
        conv.weight.mul_(-2.0)  # the shared parameter changed in place: packed again
        x = _channels_last(1, 16, 8, 8)
        torch.testing.assert_close(packed(x), conv(x), atol=1e-5, rtol=1e-5)


def test_nchw_input_keeps_nchw_output():
    conv = _conv()
    packed = FusedConv(conv, prepack=True)
    x = torch.randn(1, 16, 12, 12)
    with torch.inference_mode():
        y = packed(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)


def test_unbatched_input_is_convolved_as_nn_conv2d_does():
    conv = _conv()
    fused = FusedConv(conv, nn.ReLU(), prepack=True)
    x = torch.randn(16, 12, 10)  # C x H x W, no batch axis
    with torch.inference_mode():
        y = fused(x)
        shortcut = torch.randn(24, 12, 10)
        with_shortcut = fused(x, shortcut)
    torch.testing.assert_close(y, torch.relu(conv(x)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_shortcut, torch.relu(conv(x) + shortcut), atol=1e-5, rtol=1e-5)


def test_copies_repack_and_gradients_take_the_plain_path():
    conv = _conv()
    packed = FusedConv(conv, nn.ReLU(), prepack=True)
    x = _channels_last(1, 16, 10, 10)
    with torch.inference_mode():
        expected = packed(x)
    twin = copy.deepcopy(packed)  # oneDNN's opaque tensor is not copied
    assert twin._packed.value is None
    with torch.inference_mode():
        assert torch.equal(twin(x), expected)
    packed.weight.requires_grad_(True)
    loss = packed(x).sum()
    loss.backward()
    assert packed.weight.grad is not None and packed.weight.grad.abs().sum() > 0


def test_prepack_conv_weights_keeps_outputs_and_state_dict_names():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 3, padding="same"),
    ).eval().requires_grad_(False)
    keys = list(model.state_dict())
    x = _channels_last(2, 3, 16, 16)
    with torch.inference_mode():
        expected = model(x)
        assert prepack_conv_weights(model) == 2  # the "same"-padded one stays a plain Conv2d
        assert [type(m) for m in model] == [FusedConv, nn.ReLU, FusedConv, nn.Conv2d]
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys


def test_fused_conv_refuses_what_onednn_cannot_run():
    with pytest.raises(ValueError, match="plain zero-padded"):
        FusedConv(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="ReLU or GELU"):
        FusedConv(nn.Conv2d(3, 3, 1), nn.Sigmoid())


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("stride", [1, 2])
def test_residual_is_added_before_the_activation_inside_the_kernel(dtype, stride):
    conv = _conv(dtype, stride=stride)
    fused = FusedConv(conv, nn.ReLU(), prepack=True)
    x = _channels_last(2, 16, 20, 24, dtype=dtype)
    residual = _channels_last(2, 24, 20 // stride, 24 // stride, dtype=dtype)
    with torch.inference_mode():
        got = fused(x, residual)
        expected = torch.relu(conv(x).float() + residual.float())
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(got.float(), expected, **tolerance)
    assert (got == 0).any() and (got > 0).any()  # the ReLU acted on the sum


def test_residual_without_activation_and_operands_oneDNN_cannot_take():
    conv = _conv()
    x = _channels_last(1, 16, 10, 10)
    residual = _channels_last(1, 24, 10, 10)
    with torch.inference_mode():
        expected = conv(x) + residual
        torch.testing.assert_close(FusedConv(conv, prepack=True)(x, residual), expected)
        # NCHW residual, GELU after the addition: computed step by step, same values
        torch.testing.assert_close(FusedConv(conv)(x, residual.contiguous()), expected)
        torch.testing.assert_close(FusedConv(conv, nn.GELU())(x, residual), nn.functional.gelu(expected))


def test_residual_with_gradients_takes_the_plain_path():
    conv = _conv()
    conv.requires_grad_(True)
    fused = FusedConv(conv, nn.ReLU())
    x, residual = torch.randn(1, 16, 8, 8), torch.randn(1, 24, 8, 8, requires_grad=True)
    fused(x, residual).sum().backward()
    assert conv.weight.grad is not None and residual.grad is not None
