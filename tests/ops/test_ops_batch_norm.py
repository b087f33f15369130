"""BatchNorm in training with the shortcut addition and ReLU after it, natively
(seglab.ops.batch_norm), against nn.BatchNorm2d + addition + ReLU in float64: outputs, the
gradients of the map, the shortcut, the weight and the bias, the running statistics, grouped
short rows, the threads, and which calls qualify."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from seglab.ops import native
from seglab.ops.batch_norm import batch_norm_act, takes_native_batch_norm

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"the native kernels are not available: {native.unavailable_reason()}")

CL = torch.channels_last


def _norm(channels: int, seed: int = 0, **options) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if norm.affine:
            norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            norm.bias.copy_(torch.rand(channels, generator=generator) - 0.5)
        if norm.track_running_stats:
            norm.running_mean.copy_(torch.randn(channels, generator=generator))
            norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return norm


def _map(shape: tuple[int, ...], dtype: torch.dtype, seed: int, offset: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # An offset far from zero: the statistics must not cancel in the sum of squares.
    return (2 * torch.randn(shape, generator=generator) + offset).to(dtype).contiguous(memory_format=CL)


def _reference(x: torch.Tensor, norm: nn.BatchNorm2d, shortcut: torch.Tensor | None, relu: bool,
               grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """The module's forward and backward in float64 (on a copy of `norm`)."""
    twin = _norm(norm.num_features, affine=norm.affine, track_running_stats=norm.track_running_stats,
                 momentum=norm.momentum).double()
    twin.load_state_dict(norm.state_dict())
    x64 = x.detach().double().requires_grad_()
    s64 = None if shortcut is None else shortcut.detach().double().requires_grad_()
    y = twin(x64)
    y = y if s64 is None else y + s64
    y = torch.relu(y) if relu else y
    y.backward(grad.double())
    return _results(y, x64, s64, twin)


def _native(x: torch.Tensor, norm: nn.BatchNorm2d, shortcut: torch.Tensor | None, relu: bool,
            grad: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    shortcut = None if shortcut is None else shortcut.detach().clone().requires_grad_()
    # (float32 maps do not take the training route, but the kernels compute them all the same)
    assert takes_native_batch_norm(x, norm, shortcut) == (x.dtype == torch.bfloat16)
    y = batch_norm_act(x, norm, relu=relu, shortcut=shortcut)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=CL)
    y.backward(grad)
    assert x.grad.dtype == x.dtype and x.grad.is_contiguous(memory_format=CL)
    return _results(y, x, shortcut, norm)


def _results(y: torch.Tensor, x: torch.Tensor, shortcut: torch.Tensor | None,
             norm: nn.BatchNorm2d) -> dict[str, torch.Tensor]:
    out = {"y": y.detach(), "x": x.grad, "running_mean": norm.running_mean, "running_var": norm.running_var}
    if shortcut is not None:
        out["shortcut"] = shortcut.grad
    if norm.affine:
        out["weight"], out["bias"] = norm.weight.grad, norm.bias.grad
    return out


def _compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert got.keys() == want.keys()
    for name, expected in want.items():
        if expected is None:
            continue
        value = got[name].double()
        # Maps in bf16 are one bf16 rounding (2^-8 relative) from the float64 values; the
        # per-channel sums and statistics are float32 throughout.
        rounding = 2.0 ** -7 if dtype == torch.bfloat16 and name in ("y", "x", "shortcut") else 1e-4
        scale = expected.abs().max().item() + 1e-6
        assert (value - expected).abs().max().item() <= rounding * scale, name


# Channels: short rows grouped (3, 16: grouped to 64 values), odd counts, wide ones; pixels: an
# odd count (no grouping), even ones, more than one chunk.
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 16, 9, 10), (2, 48, 7, 5), (2, 21, 33, 33), (4, 256, 16, 16),
                                   (2, 1024, 4, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shortcut", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_matches_the_module_in_float64(shape, dtype, shortcut, relu):
    x = _map(shape, dtype, seed=1, offset=3.0)
    s = _map(shape, dtype, seed=2) if shortcut else None
    grad = _map(shape, dtype, seed=3)
    norm = _norm(shape[1])
    want = _reference(x, norm, s, relu, grad)
    got = _native(x, norm, s, relu, grad)
    _compare(got, want, dtype)
    assert int(norm.num_batches_tracked) == 1


@pytest.mark.parametrize("options", [dict(affine=False), dict(track_running_stats=False), dict(momentum=None)])
def test_module_options(options):
    shape = (2, 8, 6, 6)
    x, grad = _map(shape, torch.float32, seed=4), _map(shape, torch.float32, seed=5)
    norm = _norm(8, **options)
    want = _reference(x, norm, None, True, grad)
    got = _native(x, norm, None, True, grad)
    _compare(got, want, torch.float32)
    if norm.track_running_stats:  # momentum None: the cumulative average, over two calls
        second = _map(shape, torch.float32, seed=6)
        norm.zero_grad(set_to_none=True)
        want = _reference(second, norm, None, True, grad)
        got = _native(second, norm, None, True, grad)
        _compare(got, want, torch.float32)


def test_the_relu_mask_comes_from_the_float32_sum():
    # In bf16 PyTorch rounds the norm, then the sum, and masks the rounded sum; here the sum is
    # computed in float32 from the map and masked before its one rounding: against float64 the
    # gradient of the shortcut is exact.
    shape = (4, 32, 16, 16)
    x, s, grad = (_map(shape, torch.bfloat16, seed=k) for k in (7, 8, 9))
    got = _native(x, _norm(32), s, True, grad)
    want = _reference(x, _norm(32), s, True, grad)
    assert torch.equal(got["shortcut"].double(), want["shortcut"])


def test_results_do_not_depend_on_the_threads():
    shape = (4, 64, 32, 32)
    x, s, grad = (_map(shape, torch.float32, seed=k, offset=1.0) for k in (10, 11, 12))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(_native(x, _norm(64), s, True, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name, value in results[0].items():
            assert torch.equal(value, other[name]), name


def test_no_input_gradient_when_the_map_needs_none():
    shape = (2, 8, 5, 5)
    norm = _norm(8)
    x = _map(shape, torch.float32, seed=13)  # no requires_grad
    y = batch_norm_act(x, norm, relu=True)
    y.sum().backward()
    assert x.grad is None and norm.weight.grad is not None and norm.bias.grad is not None


def test_which_calls_qualify():
    norm = _norm(8)
    x = _map((2, 8, 4, 4), torch.bfloat16, seed=14)
    assert takes_native_batch_norm(x, norm)
    assert not takes_native_batch_norm(x.float(), norm)  # float32: PyTorch's operators ran faster
    assert not takes_native_batch_norm(x.contiguous(), norm)  # NCHW
    assert not takes_native_batch_norm(x.half(), norm)
    assert not takes_native_batch_norm(x[:1, :, :1, :1], norm)  # one value per channel
    assert not takes_native_batch_norm(x, norm.eval())
    norm.train()
    assert not takes_native_batch_norm(x, nn.SyncBatchNorm(8))  # (subclasses have their own forward)
    assert not takes_native_batch_norm(x, norm.double())
    norm.float()
    assert not takes_native_batch_norm(x, norm, shortcut=x.float())  # dtypes differ
    assert not takes_native_batch_norm(x, norm, shortcut=x[:1])
    assert not takes_native_batch_norm(x, norm, shortcut=x.contiguous())
    assert takes_native_batch_norm(x, norm, shortcut=x.clone())


def test_native_wrappers_refuse_bad_input():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="rows x channels"):
        native.batch_norm_forward(torch.randn(2, 4, 3, 3), None, None)
    with pytest.raises(ValueError, match="one entry per channel"):
        native.batch_norm_forward(x, torch.ones(5), None)
    with pytest.raises(ValueError, match="shortcut"):
        native.batch_norm_forward(x, None, None, shortcut=torch.randn(10, 5))
    with pytest.raises(ValueError, match="without rows"):
        native.batch_norm_forward(torch.randn(0, 4), None, None)
    with pytest.raises(ValueError, match="go together"):
        native.batch_norm_forward(x, None, None, running_mean=torch.zeros(4))
    y, saved = native.batch_norm_forward(x, None, None)
    with pytest.raises(ValueError, match="saved rows"):
        native.batch_norm_backward(y, x, saved[:3])


def test_the_output_may_be_changed_in_place():
    # A norm whose module is followed by an in-place ReLU the route cannot see (PSPNet's pooling
    # stages): the output is a tensor of its own, not a view autograd would refuse to change.
    x = _map((2, 8, 4, 4), torch.float32, seed=15).requires_grad_()
    y = batch_norm_act(x, _norm(8))
    torch.relu_(y).sum().backward()
    want = x.detach().clone().requires_grad_()
    torch.relu_(_norm(8)(want)).sum().backward()
    assert torch.allclose(x.grad, want.grad, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_second_output_gradient_is_added_as_autograd_would_add_it(dtype):
    """The kernel's second gradient of the output against the two added first (in the maps'
    dtype, as autograd adds them), bit for bit; refused without the forward's output."""
    x, shortcut = _map((2, 24, 9, 7), dtype, 1, offset=3.0), _map((2, 24, 9, 7), dtype, 2)
    first, second = _map((2, 24, 9, 7), dtype, 3), _map((2, 24, 9, 7), dtype, 4)
    rows = [t.permute(0, 2, 3, 1).reshape(-1, 24) for t in (x, shortcut, first, second)]
    norm = _norm(24)
    y, saved = native.batch_norm_forward(rows[0], norm.weight.detach(), norm.bias.detach(), shortcut=rows[1], relu=True)
    added = native.batch_norm_backward(rows[2] + rows[3], rows[0], saved, relu=True, y=y)
    apart = native.batch_norm_backward(rows[2], rows[0], saved, relu=True, y=y, grad2=rows[3])
    assert all(torch.equal(a, b) for a, b in zip(added, apart))
    with pytest.raises(ValueError, match="goes with the forward's output"):
        native.batch_norm_backward(rows[2], rows[0], saved, relu=True, grad2=rows[3])


@pytest.mark.parametrize("use", ["both", "output", "view"])
def test_the_output_given_twice_takes_each_uses_gradient(use):
    """`batch_norm_act_twice`'s two tensors: the gradients of x, the shortcut and the
    parameters as when one output is read twice and autograd adds, bit for bit, whichever of
    the two the caller reads."""
    from seglab.ops.batch_norm import batch_norm_act_twice
    x, shortcut = _map((2, 32, 6, 5), torch.bfloat16, 5, offset=1.0), _map((2, 32, 6, 5), torch.bfloat16, 6)
    upstream = [_map((2, 32, 6, 5), torch.bfloat16, seed) for seed in (7, 8)]
    results = []
    for twice in (True, False):
        norm = _norm(24 + 8)
        leaves = [t.detach().clone().requires_grad_() for t in (x, shortcut)]
        if twice:
            first, second = batch_norm_act_twice(leaves[0], norm, shortcut=leaves[1])
            assert second.data_ptr() == first.data_ptr()
        else:
            first = second = batch_norm_act(leaves[0], norm, relu=True, shortcut=leaves[1])
        terms = {"both": [(first, 0), (second, 1)], "output": [(first, 0)], "view": [(second, 1)]}[use]
        sum((out.float() * upstream[i].float()).sum() for out, i in terms).backward()
        results.append([leaves[0].grad, leaves[1].grad, norm.weight.grad, norm.bias.grad])
    assert all(torch.equal(a, b) for a, b in zip(*results))
