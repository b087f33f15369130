"""The Mix-FFN's depthwise convolution and GELU by one native kernel each way
(seglab.ops.depthwise_gelu): the values and the three gradients PyTorch's operators give, in
float32 and to bf16's rounding, whatever the threads; taken only where it computes the same
thing; bad inputs refused in one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.encoders.mit import MixFFN
from seglab.ops import native
from seglab.ops.depthwise_gelu import depthwise_gelu_fits, native_depthwise_gelu

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"the native kernels are not available: {native.unavailable_reason()}")


def _conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
    nn.init.normal_(conv.weight, 0.0, 0.3)
    nn.init.normal_(conv.bias, 0.0, 0.2)  # not zeros: a missing bias would show
    return conv


def _as_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return tokens.reshape(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2)


def _reference(tokens: torch.Tensor, height: int, width: int, conv: nn.Conv2d, upstream: torch.Tensor):
    """GELU(conv(tokens)) and its gradients by PyTorch's operators in float64."""
    x = tokens.detach().double().requires_grad_()
    weight, bias = conv.weight.detach().double().requires_grad_(), conv.bias.detach().double().requires_grad_()
    out = F.gelu(F.conv2d(_as_map(x, height, width), weight, bias, padding=1, groups=weight.shape[0]))
    out = out.permute(0, 2, 3, 1).reshape(tokens.shape)
    return (out, *torch.autograd.grad(out, (x, weight, bias), upstream.double()))


def _ours(tokens: torch.Tensor, height: int, width: int, conv: nn.Conv2d, upstream: torch.Tensor):
    x = tokens.detach().clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    out = native_depthwise_gelu(x, height, width, conv)
    out.backward(upstream)
    return out, x.grad, conv.weight.grad, conv.bias.grad


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(2, 5, 7, 32), (3, 4, 1, 16), (1, 1, 6, 48), (2, 9, 3, 16)])
def test_float32_values_and_gradients_are_pytorchs(shape, threads):
    n, height, width, channels = shape
    torch.manual_seed(0)
    conv = _conv(channels)
    tokens, upstream = torch.randn(n, height * width, channels), torch.randn(n, height * width, channels)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # three parts of the rows: part boundaries inside images
    try:
        ours = _ours(tokens, height, width, conv, upstream)
    finally:
        torch.set_num_threads(before)
    for name, a, e in zip(("out", "tokens' grad", "weight's grad", "bias's grad"), ours,
                          _reference(tokens, height, width, conv, upstream)):
        assert a.dtype == torch.float32 and a.shape == e.shape, name
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_rounds_the_convolution_and_gelu_once_each_and_keeps_float32_gradients_inside():
    n, height, width, channels = 2, 8, 8, 64
    torch.manual_seed(1)
    conv = _conv(channels)
    tokens = torch.randn(n, height * width, channels).bfloat16()
    upstream = torch.randn(n, height * width, channels).bfloat16()
    out, grad_tokens, grad_weight, grad_bias = _ours(tokens, height, width, conv, upstream)
    assert out.dtype == grad_tokens.dtype == torch.bfloat16
    assert grad_weight.dtype == grad_bias.dtype == torch.float32
    # The convolution in float32 arithmetic on the bf16 tokens, rounded, then GELU of that, rounded.
    pre = F.conv2d(_as_map(tokens.float(), height, width), conv.weight.detach(), conv.bias.detach(), padding=1,
                   groups=channels).permute(0, 2, 3, 1).reshape(tokens.shape)
    expected = F.gelu(pre.bfloat16().float()).bfloat16()
    differing = (out != expected).float().mean().item()
    assert differing < 0.01  # a rounding flipped by float32 summation order, at most
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.01, atol=0.01)
    # Gradients against float64 ones taken through GELU at the bf16 pre: only d tokens is rounded.
    reference = _reference(tokens.float(), height, width, conv, upstream.float())
    for name, a, e in (("tokens", grad_tokens, reference[1]), ("weight", grad_weight, reference[2]),
                       ("bias", grad_bias, reference[3])):
        assert ((a.double() - e).norm() / e.norm()).item() < 0.01, name


def test_the_gradients_do_not_depend_on_the_threads_beyond_rounding():
    torch.manual_seed(2)
    conv = _conv(32)
    tokens, upstream = torch.randn(3, 6 * 5, 32), torch.randn(3, 6 * 5, 32)
    results = []
    before = torch.get_num_threads()
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        try:
            results.append(_ours(tokens, 6, 5, conv, upstream))
        finally:
            torch.set_num_threads(before)
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])  # per pixel: exact
        torch.testing.assert_close(other[2], results[0][2], rtol=1e-6, atol=1e-6)  # sums split differently
        torch.testing.assert_close(other[3], results[0][3], rtol=1e-6, atol=1e-6)


def test_taken_only_where_it_computes_the_same_thing():
    conv, tokens = _conv(32), torch.randn(2, 12, 32)
    assert depthwise_gelu_fits(tokens, conv, nn.GELU())
    assert depthwise_gelu_fits(tokens.bfloat16(), conv, nn.GELU())
    assert not depthwise_gelu_fits(tokens, conv, nn.GELU(approximate="tanh"))
    assert not depthwise_gelu_fits(tokens, conv, nn.ReLU())
    assert not depthwise_gelu_fits(tokens.double(), conv, nn.GELU())
    assert not depthwise_gelu_fits(tokens[..., :16], conv, nn.GELU())  # channels other than the conv's
    assert not depthwise_gelu_fits(torch.randn(2, 12, 24), _conv(24), nn.GELU())  # not whole vectors
    assert not depthwise_gelu_fits(tokens, nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.GELU())
    assert not depthwise_gelu_fits(tokens, nn.Conv2d(32, 32, 3, padding=1, stride=2, groups=32), nn.GELU())
    assert not depthwise_gelu_fits(tokens, nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=32), nn.GELU())
    assert not depthwise_gelu_fits(tokens, nn.Conv2d(32, 32, 3, padding=1, groups=32, padding_mode="reflect"),
                                   nn.GELU())
    assert not depthwise_gelu_fits(tokens, nn.Conv2d(32, 32, 3, padding=1, groups=16), nn.GELU())


def test_bad_inputs_are_refused_in_one_line():
    tokens, weight, bias = torch.randn(1, 12, 32), torch.randn(9, 32), torch.randn(32)
    with pytest.raises(ValueError, match=r"N x \(height \* width\) x D tokens"):
        native.depthwise_gelu(tokens, 3, 5, weight, bias)
    with pytest.raises(ValueError, match="9 x 32"):
        native.depthwise_gelu(tokens, 3, 4, torch.randn(32, 9), bias)
    with pytest.raises(ValueError, match="multiples of 16 channels"):
        native.depthwise_gelu(torch.randn(1, 12, 24), 3, 4, torch.randn(9, 24), torch.randn(24))
    with pytest.raises(ValueError, match="the gradient must be a contiguous bfloat16"):
        native.depthwise_gelu_backward(torch.randn(1, 12, 32), torch.randn(1, 12, 32).bfloat16(),
                                       tokens.bfloat16(), 3, 4, weight)


def test_mix_ffn_training_through_the_route_matches_its_operators():
    torch.manual_seed(3)
    ffn = MixFFN(32, 64).train()
    for parameter in ffn.parameters():
        nn.init.normal_(parameter, 0.0, 0.2)
    tokens = torch.randn(2, 6 * 7, 32)
    results = []
    for route in (True, False):
        ffn.native_training = route
        ffn.zero_grad(set_to_none=True)
        x = tokens.clone().requires_grad_()
        out = ffn(x, 6, 7)
        out.square().mean().backward()
        results.append((out.detach(), x.grad, {name: p.grad for name, p in ffn.named_parameters()}))
    (out, grad, grads), (twin_out, twin_grad, twin_grads) = results
    torch.testing.assert_close(out, twin_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, twin_grad, rtol=1e-5, atol=1e-6)
    for name, value in grads.items():
        torch.testing.assert_close(value, twin_grads[name], rtol=1e-4, atol=1e-6, msg=name)
