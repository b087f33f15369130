"""SegFormer's Mix-FFN by the native kernel (seglab.ops.mix_ffn): the same block as its four
operators, taken only where it computes the same thing, and its kept weights never stale."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from seglab.encoders.mit import MixFFN
from seglab.ops import native
from seglab.ops.mix_ffn import mix_ffn_fits

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
        assert not _fits(ffn, tokens.to(torch.bfloat16))
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
