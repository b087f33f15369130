"""The convolution whose weight gradient runs by the kernel timed fastest: every kernel computes
eager PyTorch's gradient, and the tuning keeps the fastest per shape."""
import pytest
import torch
import torch.nn.functional as F

import seglab.ops.weight_gradient as weight_gradient_module
from seglab.ops.weight_gradient import (
    FIXED_METHOD,
    METHODS,
    ConvSettings,
    candidates,
    chosen_methods,
    clear_choices,
    takes_tuned_weight_gradient,
    tuned_convolution,
    weight_gradient_by,
)

CL = torch.channels_last

# (input channels, output channels, kernel, settings): a ResNet's 3x3, strided and 1x1 shortcut
# convolutions, its 7x7 stem, a dilated one, and a U-Net decoder's stride-2 transposed 4x4.
CASES = {
    "3x3": (6, 5, 3, ConvSettings((1, 1), (1, 1), (1, 1))),
    "strided": (6, 5, 3, ConvSettings((2, 2), (1, 1), (1, 1))),
    "1x1 shortcut": (6, 5, 1, ConvSettings((2, 2), (0, 0), (1, 1))),
    "stem": (3, 5, 7, ConvSettings((2, 2), (3, 3), (1, 1))),
    "dilated": (6, 5, 3, ConvSettings((1, 1), (2, 2), (2, 2))),
    "transposed": (6, 5, 4, ConvSettings((2, 2), (1, 1), (1, 1), transposed=True)),
}


@pytest.fixture(autouse=True)
def _fresh_choices():
    clear_choices()
    yield
    clear_choices()


def _case(name: str, layout: torch.memory_format = CL, bias: bool = True):
    in_channels, out_channels, kernel, settings = CASES[name]
    shape = (in_channels, out_channels) if settings.transposed else (out_channels, in_channels)
    x = torch.randn(2, in_channels, 13, 11).contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(*shape, kernel, kernel).contiguous(memory_format=layout).requires_grad_()
    b = torch.randn(out_channels).requires_grad_() if bias else None
    return x, weight, b, settings


def _eager(x, weight, bias, settings):
    if settings.transposed:
        return F.conv_transpose2d(x, weight, bias, settings.stride, settings.padding, settings.output_padding,
                                  settings.groups, settings.dilation)
    return F.conv2d(x, weight, bias, settings.stride, settings.padding, settings.dilation, settings.groups)


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("name", list(CASES))
def test_every_kernel_computes_eager_pytorchs_weight_gradient(name, layout):
    torch.manual_seed(0)
    x, weight, bias, settings = _case(name, layout)
    out = _eager(x, weight, bias, settings)
    upstream = torch.randn_like(out)
    expected, = torch.autograd.grad(out, weight, upstream)
    methods = candidates(upstream, x, weight, settings)
    assert ("taps" in methods) == (settings.stride == (1, 1) and not settings.transposed)
    for method in methods:
        got = weight_gradient_by(method, upstream, x.detach(), weight.detach(), settings)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4, msg=f"{method}: {name}")


def test_the_taps_kernel_refuses_what_it_does_not_compute():
    x, weight, bias, settings = _case("strided")
    upstream = torch.randn_like(_eager(x, weight, bias, settings))
    with pytest.raises(ValueError, match="stride-1"):
        weight_gradient_by("taps", upstream, x.detach(), weight.detach(), settings)


@pytest.mark.parametrize("kernel, padding, dilation", [
    ((1, 3), (0, 1), (1, 1)), ((3, 1), (1, 0), (1, 1)),  # separable halves
    ((3, 3), (0, 0), (1, 1)), ((3, 3), (2, 2), (1, 1)),  # a smaller and a larger output than the map
    ((5, 3), (4, 1), (2, 1)),  # dilated along one axis only
])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_the_taps_kernel_for_any_stride_1_geometry(kernel, padding, dilation, layout):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 17, 23).contiguous(memory_format=layout)
    weight = torch.randn(7, 5, *kernel).contiguous(memory_format=layout)
    settings = ConvSettings((1, 1), padding, dilation)
    upstream = torch.randn_like(torch.ops.aten.convolution(x, weight, None, *settings.arguments()))
    expected = weight_gradient_by("onednn", upstream, x, weight, settings)
    torch.testing.assert_close(weight_gradient_by("taps", upstream, x, weight, settings), expected,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("pixels", [1, 4096 * 2 + 7], ids=["no whole chunk", "chunks and a rest"])
def test_the_taps_kernel_over_whole_chunks_and_the_rest(pixels):
    # The padded grid's rows run in chunks of CHUNK_PIXELS and a remainder; both parts count.
    # Each weight is a sum over 8,199 pixels, so the reference is computed in float64: oneDNN's
    # own float32 sum is off by up to 4e-4 on some processors (AVX-512 without BF16).
    torch.manual_seed(0)
    x = torch.randn(1, 3, 1, pixels).contiguous(memory_format=CL)
    weight = torch.randn(4, 3, 3, 3).contiguous(memory_format=CL)
    settings = ConvSettings((1, 1), (1, 1), (1, 1))
    upstream = torch.randn(1, 4, 1, pixels).contiguous(memory_format=CL)
    expected = torch.ops.aten.convolution_backward(upstream.double(), x.double(), weight.double(), None,
                                                   *settings.arguments(), [False, True, False])[1]
    got = weight_gradient_by("taps", upstream, x, weight, settings)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("name", list(CASES))
def test_tuned_convolution_equals_the_convolution_and_its_three_gradients(name, bias, monkeypatch):
    monkeypatch.setattr(weight_gradient_module, "MIN_TUNED_FLOPS", 0)  # tune even these small ones
    torch.manual_seed(0)
    x, weight, b, settings = _case(name, bias=bias)
    inputs = [x, weight] + ([b] if bias else [])
    expected = _eager(x, weight, b, settings)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    for call in range(2):  # the first backward tunes, the second runs the choice
        out = tuned_convolution(x, weight, b, settings)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same forward kernel
        for got, want in zip(torch.autograd.grad(out, inputs, upstream), expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    grad_weight = torch.autograd.grad(tuned_convolution(x, weight, b, settings), weight, upstream)[0]
    assert grad_weight.is_contiguous(memory_format=CL)  # in the weight's layout, as eager autograd keeps it
    (method, seconds), = chosen_methods().values()
    assert set(seconds) == set(candidates(upstream, x, weight, settings)) and method == min(seconds, key=seconds.get)


def test_untimed_the_kernel_is_fixed_and_the_same_bits_come_every_run(monkeypatch):
    """Timing picks by the clock, so two runs can differ; untimed, nothing is timed and nothing
    remembered, and the large gradients run by `FIXED_METHOD`, the small ones by oneDNN's."""
    calls = []
    real = weight_gradient_module.weight_gradient_by

    def recording(method, *args):
        calls.append(method)
        return real(method, *args)

    def no_clock(call):
        raise AssertionError("timed")

    monkeypatch.setattr(weight_gradient_module, "weight_gradient_by", recording)
    monkeypatch.setattr(weight_gradient_module, "_timed", no_clock)
    torch.manual_seed(0)
    x, weight, b, settings = _case("3x3")
    upstream = torch.randn_like(_eager(x, weight, b, settings))
    expected = torch.autograd.grad(_eager(x, weight, b, settings), [x, weight, b], upstream)
    runs = []
    for minimum in (10**12, 0):  # small: oneDNN's, with the input's gradient; large: FIXED_METHOD
        monkeypatch.setattr(weight_gradient_module, "MIN_TUNED_FLOPS", minimum)
        for _ in range(2):
            calls.clear()
            out = tuned_convolution(x, weight, b, settings, timed=False)
            grads = torch.autograd.grad(out, [x, weight, b], upstream)
            for got, want in zip(grads, expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
            assert calls == ([] if minimum else [FIXED_METHOD]) and not chosen_methods()
            runs.append(grads[1])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])


def test_first_layer_without_an_input_gradient():
    torch.manual_seed(0)
    x, weight, bias, settings = _case("stem")
    image = x.detach()  # the input of a network needs no gradient
    upstream = torch.randn_like(_eager(image, weight, bias, settings))
    grads = torch.autograd.grad(tuned_convolution(image, weight, bias, settings), [weight, bias], upstream)
    expected = torch.autograd.grad(_eager(image, weight, bias, settings), [weight, bias], upstream)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_small_gradients_keep_onednns_kernel_untimed_and_similar_sizes_share_a_choice(monkeypatch):
    timed = []  # every call of a kernel, timed or not
    real = weight_gradient_module.weight_gradient_by

    def recording(method, *args):
        timed.append(method)
        return real(method, *args)

    monkeypatch.setattr(weight_gradient_module, "weight_gradient_by", recording)
    x, weight, bias, settings = _case("3x3")
    tuned_convolution(x, weight, bias, settings).sum().backward()
    (method, seconds), = chosen_methods().values()
    assert (method, seconds) == ("onednn", {}) and timed == ["onednn"]  # 2 x 13 x 11 pixels: nothing to win

    monkeypatch.setattr(weight_gradient_module, "MIN_TUNED_FLOPS", 0)
    clear_choices()
    calls_per_size = {}
    for size in (50, 60, 33, 128):  # 50 x 50 and 60 x 60 pixels are one size class (2^11 to 2^12)
        y = torch.randn(1, 6, size, size).contiguous(memory_format=CL)
        before = len(timed)
        tuned_convolution(y, weight, None, settings).sum().backward()
        calls_per_size[size] = timed[before:]
    choices = chosen_methods()
    assert sorted(key[3] for key in choices) == [11, 12, 15]  # the pixels' bit lengths
    # Per size class one call of each kernel, then a second of those within 2x of the fastest.
    for size in (50, 33, 128):
        assert calls_per_size[size][:len(METHODS)] == list(METHODS)
        assert len(METHODS) < len(calls_per_size[size]) <= 2 * len(METHODS)
    # The second 2^12 call runs the choice (oneDNN's in the same call as the input's gradient).
    shared = next(method for key, (method, _) in choices.items() if key[3] == 12)
    assert calls_per_size[60] == ([] if shared == "onednn" else [shared])


def test_a_kernel_that_refuses_the_settings_drops_out_of_the_timing(monkeypatch):
    monkeypatch.setattr(weight_gradient_module, "MIN_TUNED_FLOPS", 0)
    real = weight_gradient_module.weight_gradient_by

    def without_im2col(method, *args):
        if method == "im2col":
            raise RuntimeError("not implemented for these settings")
        return real(method, *args)

    monkeypatch.setattr(weight_gradient_module, "weight_gradient_by", without_im2col)
    x, weight, bias, settings = _case("strided")
    upstream = torch.randn_like(_eager(x, weight, bias, settings))
    got, = torch.autograd.grad(tuned_convolution(x, weight, bias, settings), weight, upstream)
    expected, = torch.autograd.grad(_eager(x, weight, bias, settings), weight, upstream)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    (method, seconds), = chosen_methods().values()
    assert set(seconds) == {"onednn", "channels_first"} and method in seconds


@pytest.mark.parametrize("name", ["3x3", "transposed"])
def test_im2col_is_not_timed_where_its_column_buffer_is_large(name, monkeypatch):
    from seglab.ops.weight_gradient import _im2col_bytes

    monkeypatch.setattr(weight_gradient_module, "MIN_TUNED_FLOPS", 0)
    x, weight, bias, settings = _case(name)
    output = _eager(x, weight, bias, settings)
    # One image's patches: 6 x 3 x 3 per output pixel; 5 x 4 x 4 per input pixel when transposed.
    patch, pixels = (5 * 4 * 4, 13 * 11) if settings.transposed else (6 * 3 * 3, output[0, 0].numel())
    assert _im2col_bytes(output, x, weight, settings) == 4 * patch * pixels
    monkeypatch.setattr(weight_gradient_module, "MAX_IM2COL_BYTES", 4 * patch * pixels - 1)
    got, = torch.autograd.grad(tuned_convolution(x, weight, bias, settings), weight, torch.ones_like(output))
    expected, = torch.autograd.grad(output, weight, torch.ones_like(output))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    (method, seconds), = chosen_methods().values()
    assert set(seconds) == {"onednn", "channels_first"} | ({"taps"} if name == "3x3" else set()) and method in seconds


def test_the_tuning_is_for_dense_float32_cpu_convolutions_outside_autocast():
    x, weight = torch.randn(2, 6, 8, 8), torch.randn(5, 6, 3, 3)
    assert takes_tuned_weight_gradient(x, weight, groups=1)
    assert not takes_tuned_weight_gradient(x, torch.randn(6, 1, 3, 3), groups=6)  # depthwise
    assert not takes_tuned_weight_gradient(x.bfloat16(), weight.bfloat16(), groups=1)
    assert not takes_tuned_weight_gradient(x[0], weight, groups=1)  # unbatched
    with torch.autocast("cpu", torch.bfloat16):
        assert not takes_tuned_weight_gradient(x, weight, groups=1)
