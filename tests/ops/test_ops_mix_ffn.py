"""SegFormer's Mix-FFN by the native kernel (seglab.ops.mix_ffn): the same block as its four
operators, taken only where it computes the same thing, and its kept weights never stale."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from seglab.encoders.mit import MixFFN
from seglab.ops import native
from seglab.ops.kept import KeptFromWeights
from seglab.ops.mix_ffn import mix_ffn_fits, native_mix_ffn

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"the native kernels are not available: {native.unavailable_reason()}")


def _ffn(dim: int = 32, hidden: int = 128) -> MixFFN:
    torch.manual_seed(0)
    ffn = MixFFN(dim, hidden).eval()
    for parameter in ffn.parameters():  # biases too: zeros would hide a missing one
        nn.init.normal_(parameter, 0.0, 0.2)
    return ffn


def _fits(ffn: MixFFN, tokens: torch.Tensor) -> bool:
    return mix_ffn_fits(tokens, ffn.fc1, ffn.dwconv, ffn.act, ffn.fc2)


@pytest.mark.parametrize("residual", [False, True])
def test_native_mix_ffn_computes_the_block_its_four_operators_do(residual):
    ffn, tokens = _ffn(), torch.randn(2, 6 * 10, 32)
    shortcut = torch.randn_like(tokens) if residual else None
    with torch.inference_mode():
        expected = ffn(tokens, 6, 10, residual=shortcut)
        ffn.native = True
        assert _fits(ffn, tokens)
        result = ffn(tokens, 6, 10, residual=shortcut)
    torch.testing.assert_close(result, expected, rtol=0, atol=2e-6 * expected.abs().max().item())


def test_native_mix_ffn_is_taken_only_where_it_computes_the_same_thing():
    ffn, tokens = _ffn(), torch.randn(1, 16, 32)
    with torch.no_grad():
        assert _fits(ffn, tokens)
        assert not _fits(ffn, tokens.to(torch.bfloat16))  # float32 weights: tokens and weights of one dtype
        assert _fits(_ffn().bfloat16(), tokens.to(torch.bfloat16)) == native.bf16_pairs()
        assert not _fits(ffn, tokens[0])  # not N x L x C
        assert not mix_ffn_fits(tokens, ffn.fc1, ffn.dwconv, ffn.act, ffn.fc2, residual=tokens[:, :8])
    assert not _fits(ffn, tokens)  # gradients recorded for the weights
    with torch.no_grad():
        ffn.act = nn.GELU(approximate="tanh")
        assert not _fits(ffn, tokens)
        assert not _fits(_ffn(8, 32), torch.randn(1, 16, 8))  # channels not whole vectors


def test_native_mix_ffn_module_still_trains_by_its_operators():
    ffn, tokens = _ffn(), torch.randn(1, 4 * 4, 32)
    ffn.native = True
    ffn(tokens, 4, 4, residual=tokens).sum().backward()  # (the native kernel has no backward)
    assert ffn.fc1.weight.grad is not None and ffn.dwconv.weight.grad.abs().sum() > 0


def test_native_mix_ffn_follows_weights_loaded_after_its_first_call():
    ffn, tokens = _ffn(), torch.randn(1, 5 * 3, 32)
    ffn.native = True
    with torch.inference_mode():
        before = ffn(tokens, 5, 3)
    other = _ffn()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(-1.5)
    ffn.load_state_dict(other.state_dict())
    with torch.inference_mode():
        after = ffn(tokens, 5, 3)
        other.native = False
        expected = other(tokens, 5, 3)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=2e-6 * expected.abs().max().item())


def test_native_mix_ffn_normalises_its_input_first_where_given_a_layernorm():
    ffn, tokens = _ffn(), torch.randn(2, 4 * 9, 32) * 2 + 1
    norm = nn.LayerNorm(32, eps=1e-6)
    nn.init.normal_(norm.weight, 1.0, 0.2), nn.init.normal_(norm.bias, 0.0, 0.2)
    with torch.inference_mode():
        expected = ffn(norm(tokens), 4, 9, residual=tokens)
        ffn.native = True
        assert mix_ffn_fits(tokens, ffn.fc1, ffn.dwconv, ffn.act, ffn.fc2, norm)
        result = ffn(tokens, 4, 9, residual=tokens, norm=norm)
        for other in (nn.LayerNorm(32, elementwise_affine=False), nn.LayerNorm(16), nn.BatchNorm1d(32)):
            assert not mix_ffn_fits(tokens, ffn.fc1, ffn.dwconv, ffn.act, ffn.fc2, other)
    torch.testing.assert_close(result, expected, rtol=0, atol=2e-6 * expected.abs().max().item())


needs_pairs = pytest.mark.skipif(not native.available() or not native.bf16_pairs(),
                                 reason="this processor has no bf16 pair products (AVX-512 BF16)")


@needs_pairs
@pytest.mark.parametrize("shape", [(2, 9, 13, 32), (1, 16, 16, 64), (2, 5, 7, 160)])
def test_native_mix_ffn_in_bf16_rounds_no_more_than_the_bf16_operators(shape):
    """bf16 tokens and weights: the block (LayerNorm first, residual after) against float64 of
    the same bf16 values, no further off than PyTorch's bf16 operators."""
    n, height, width, channels = shape
    ffn, norm = _ffn(channels, 4 * channels), nn.LayerNorm(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
    ffn, norm = ffn.bfloat16(), norm.bfloat16()
    tokens = torch.randn(n, height * width, channels).bfloat16()
    with torch.inference_mode():
        expected = ffn.double()(tokens.double(), height, width, residual=tokens.double(), norm=norm.double())
        ffn, norm = ffn.bfloat16(), norm.bfloat16()
        operators = ffn(tokens, height, width, residual=tokens, norm=norm)
        assert mix_ffn_fits(tokens, ffn.fc1, ffn.dwconv, ffn.act, ffn.fc2, norm, tokens)
        result = native_mix_ffn(tokens, height, width, ffn.fc1, ffn.dwconv, ffn.fc2, KeptFromWeights(), tokens, norm)
    assert result.dtype == torch.bfloat16 and result.shape == tokens.shape

    def error(values: torch.Tensor) -> float:
        return ((values.double() - expected).norm() / expected.norm()).item()

    assert error(result) < max(1.1 * error(operators), 4e-3)


@needs_pairs
def test_native_mix_ffn_refuses_bf16_tokens_with_float32_weights_in_one_line():
    ffn, tokens = _ffn(), torch.randn(1, 16, 32).bfloat16()
    weight_t = ffn.fc1.weight.detach().t().contiguous()
    with pytest.raises(ValueError, match="fc1's weight must be a contiguous bfloat16") as error:
        native.mix_ffn(tokens, 4, 4, weight_t, ffn.fc1.bias.detach(), ffn.dwconv.weight.detach().reshape(128, 9).t(),
                       ffn.dwconv.bias.detach(), ffn.fc2.weight.detach().t().contiguous(), ffn.fc2.bias.detach())
    assert "\n" not in str(error.value)


def test_pair_rows_puts_each_outputs_pair_of_rows_side_by_side():
    matrix = torch.arange(12.0).reshape(4, 3)
    pairs = native.pair_rows(matrix)
    assert pairs.shape == (2, 3, 2) and pairs.is_contiguous()
    assert pairs[1, 2].tolist() == [matrix[2, 2].item(), matrix[3, 2].item()]
    with pytest.raises(ValueError, match="even number of rows"):
        native.pair_rows(torch.zeros(3, 4))
