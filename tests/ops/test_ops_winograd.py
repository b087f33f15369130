"""Winograd's F(2x2, 3x3), F(4x4, 3x3) and F(6x6, 3x3) against F.conv2d: values, gradients,
ragged sizes, layouts, the multiply-adds they save, their matrices, and F(2x2) in bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gradient_checks import assert_values_and_gradients_equal

from seglab.ops import native
from seglab.ops.winograd import BF16_TILE, OUTPUT_TILES, winograd_conv3x3, winograd_filters, winograd_weight_gradient


@pytest.mark.parametrize("tile", OUTPUT_TILES)
# Whole tiles of both sizes, ragged, thinner than a tile.
@pytest.mark.parametrize("size", [(8, 8), (12, 12), (9, 14), (1, 5), (4, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_convolution(tile, size, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 6, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    ours = winograd_conv3x3(x, winograd_filters(weight, tile), b)
    assert ours.shape == (2, 5, *size) and ours.is_contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x, weight, b, padding=1)
    assert_values_and_gradients_equal(ours, expected, [x, weight] + ([b] if bias else []), values_atol=1e-10,
                                      gradients_atol=1e-10)


@pytest.mark.parametrize("tile", OUTPUT_TILES)
@pytest.mark.parametrize("dilation, size", [(2, (12, 16)), (2, (9, 14)), (4, (10, 7)), (3, (2, 2))])
def test_dilated_values_and_gradients_equal_the_convolution(tile, dilation, size):
    torch.manual_seed(0)
    x = torch.randn(2, 6, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ours = winograd_conv3x3(x, winograd_filters(weight, tile), b, dilation)
    assert ours.shape == (2, 5, *size) and ours.is_contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x, weight, b, padding=dilation, dilation=dilation)
    assert_values_and_gradients_equal(ours, expected, [x, weight, b], values_atol=1e-10, gradients_atol=1e-10)


@pytest.mark.parametrize("tile, bound", [(4, 3e-5), (6, 5e-5)])
def test_float32_error_stays_at_a_few_ulps_of_the_largest_output(tile, bound):
    torch.manual_seed(0)
    x = torch.randn(1, 128, 24, 24)  # NCHW input is taken as well
    weight = torch.randn(128, 128, 3, 3) / (9 * 128) ** 0.5
    expected = F.conv2d(x.double(), weight.double(), padding=1)
    ours = winograd_conv3x3(x, winograd_filters(weight, tile))
    relative = (ours.double() - expected).abs().max() / expected.abs().max()
    assert ours.dtype == torch.float32 and relative < bound


# 144 / 36 and 324 / 64 fewer products; the transforms add a cost linear in the channels, at 128
# channels 15% (F(4x4)) and 21% (F(6x6)) on top of the products. Counted on the transforms of
# PyTorch's operators: the flop counter does not see into the native ones.
@pytest.mark.parametrize("tile, saving, transforms", [(4, 4.0, 0.2), (6, 81 / 16, 0.25)])
def test_fewer_multiply_adds_in_the_products(tile, saving, transforms, monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    x, weight = torch.randn(1, 128, 48, 48), torch.randn(128, 128, 3, 3)  # whole tiles of both
    filters = winograd_filters(weight, tile)
    with FlopCounterMode(display=False) as direct:
        F.conv2d(x, weight, padding=1)
    with FlopCounterMode(display=False) as winograd:
        winograd_conv3x3(x, filters)
    products = direct.get_total_flops() / saving  # (m + 2)^2 per m x m tile against 9 m^2
    assert products < winograd.get_total_flops() < (1 + transforms) * products


def test_the_toom_cook_construction_gives_the_papers_f4x4_matrices():
    from seglab.ops.winograd import _matrices

    b_t = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
           [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
    a_t = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    matrices = _matrices(4)
    assert torch.equal(matrices.b_t, torch.tensor(b_t, dtype=torch.float64))
    g = torch.tensor(g, dtype=torch.float64)
    torch.testing.assert_close(matrices.g_kron_g, torch.kron(g, g), rtol=0, atol=1e-15)
    assert torch.equal(matrices.a_t, torch.tensor(a_t, dtype=torch.float64))


@pytest.mark.parametrize("tile", OUTPUT_TILES)
def test_one_tile_is_the_correlation_of_its_input_tile(tile):
    from seglab.ops.winograd import _matrices

    # y = A^T [(G g) . (B^T d)] along one axis: the m outputs of a 3-tap correlation over m + 2 inputs.
    torch.manual_seed(0)
    b_t, g_kron_g, a_t = _matrices(tile)
    # G out of G (x) G: G's last row is (0, 0, 1), so G[i, j] = (G (x) G)[(m + 2) i + m + 1, 3 j + 2].
    g = g_kron_g.view(tile + 2, tile + 2, 3, 3)[:, -1, :, -1]
    d, taps = torch.randn(tile + 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = torch.stack([taps @ d[i:i + 3] for i in range(tile)])
    torch.testing.assert_close(a_t @ ((g @ taps) * (b_t @ d)), expected, rtol=0, atol=1e-12)


def test_refuses_other_kernels_and_mismatched_channels():
    with pytest.raises(ValueError, match="3x3"):
        winograd_filters(torch.randn(4, 4, 5, 5))
    with pytest.raises(ValueError, match="input channels"):
        winograd_conv3x3(torch.randn(1, 3, 8, 8), winograd_filters(torch.randn(4, 4, 3, 3)))
    with pytest.raises(ValueError, match="tiles are 2, 3, 4 or 6 wide"):
        winograd_filters(torch.randn(4, 4, 3, 3), tile=5)
    with pytest.raises(ValueError, match="Winograd's domain"):
        winograd_conv3x3(torch.randn(1, 4, 8, 8), torch.randn(49, 4, 4))


@pytest.mark.parametrize("tile", OUTPUT_TILES)
def test_tiles_gradient_adds_the_overlaps_as_unfolds_gradient_does(tile):
    from seglab.ops.winograd import _InputTiles

    side = tile + 2
    for n, rows, cols, channels in [(2, 3, 5, 4), (1, 1, 1, 3), (3, 4, 2, 1)]:
        padded = torch.randn(n, tile * rows + 2, tile * cols + 2, channels, requires_grad=True)
        upstream = torch.randn(side, side, n * rows * cols, channels)
        tiles = _InputTiles.apply(padded, tile)
        expected = padded.unfold(1, side, tile).unfold(2, side, tile).permute(4, 5, 0, 1, 2, 3).reshape(
            side, side, -1, channels)
        assert torch.equal(tiles, expected)
        got, = torch.autograd.grad(tiles, padded, upstream)
        want, = torch.autograd.grad(expected, padded, upstream)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # the same sums, in another order


@pytest.mark.parametrize("tile", OUTPUT_TILES)
def test_an_inference_call_first_leaves_the_cached_matrices_usable_for_training(tile):
    # The transform matrices are cached per tile: made under inference_mode they used to be
    # inference tensors, which a float64 call with gradients could not save for backward.
    from seglab.ops.winograd import _matrices

    _matrices.cache_clear()
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with torch.inference_mode():
        winograd_conv3x3(torch.randn(1, 2, 6, 6, dtype=torch.float64), winograd_filters(weight, tile))
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    winograd_conv3x3(x, winograd_filters(weight.requires_grad_(), tile)).sum().backward()
    assert x.grad is not None and weight.grad is not None


@pytest.mark.parametrize("dilation", [1, 2])
def test_bf16_products_by_f2x2_stay_near_a_direct_bf16_convolution_where_larger_tiles_do_not(
        winograd_transforms, dilation):
    torch.manual_seed(0)
    x = torch.randn(2, 64, 20, 18).bfloat16()
    weight = (torch.randn(48, 64, 3, 3) / 24).bfloat16()
    bias = torch.randn(48).bfloat16()
    reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=dilation, dilation=dilation)
    direct_error = (F.conv2d(x, weight, bias, padding=dilation, dilation=dilation).double() - reference).abs()

    def error(tile: int) -> torch.Tensor:
        out = winograd_conv3x3(x, winograd_filters(weight, tile), bias, dilation)
        assert out.dtype == torch.bfloat16 and out.shape == reference.shape
        return (out.double() - reference).abs()

    # F(2x2)'s transforms add at most four values: bf16 keeps them (measured 2-3.5x the direct error).
    assert error(BF16_TILE).mean() < 5 * direct_error.mean() and error(BF16_TILE).max() < 4 * direct_error.max()
    assert error(BF16_TILE).max() < 2e-2 * reference.abs().max()
    # F(4x4)'s carry differences of multiples up to 8 that bf16 rounds away (measured 21x).
    assert error(4).max() > 8 * direct_error.max()


def test_the_input_gradients_filters_are_the_rotated_transposed_kernels_for_f2x2_only():
    from seglab.ops.winograd import _flip, _input_gradient_filters

    torch.manual_seed(0)
    weight = torch.randint(-64, 64, (5, 7, 3, 3)).double()  # whole numbers: G's sums are exact in any order
    rotated = winograd_filters(weight.flip(2, 3).transpose(0, 1), 2)
    assert torch.equal(_input_gradient_filters(winograd_filters(weight, 2)), rotated)
    assert _flip(4) is None and _flip(6) is None  # +-2 and +-1/2 have no such permutation


def _channels_last(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("tile, dtype", [(4, torch.float32), (6, torch.float32), (BF16_TILE, torch.bfloat16)])
@pytest.mark.parametrize("residual, relu", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("size", [(12, 12), (9, 14)])
def test_the_residual_and_relu_in_the_output_transform_equal_separate_steps(tile, dtype, residual, relu, size):
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    torch.manual_seed(0)
    x = _channels_last(2, 16, *size, dtype=dtype)
    weight, b = torch.randn(24, 16, 3, 3).to(dtype), torch.randn(24)
    shortcut = _channels_last(2, 24, *size, dtype=dtype) if residual else None
    filters = winograd_filters(weight, tile)
    with torch.no_grad():
        fused = winograd_conv3x3(x, filters, b, residual=shortcut, relu=relu)
        separate = winograd_conv3x3(x, filters, b)
        separate = (separate.float() + (0 if shortcut is None else shortcut.float())).to(dtype)
        separate = separate.relu() if relu else separate
    assert fused.dtype == dtype and fused.is_contiguous(memory_format=torch.channels_last)
    # float32: the same sums in another order; bf16: rounded once instead of twice.
    tolerance = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(fused.float(), separate.float(), **tolerance)
    if relu:
        assert (fused >= 0).all() and (fused == 0).any()


def test_the_epilogue_with_gradients_or_a_strided_residual_takes_separate_steps():
    torch.manual_seed(0)
    x = _channels_last(1, 8, 10, 10, dtype=torch.float64).requires_grad_()
    weight = torch.randn(8, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    shortcut = _channels_last(1, 8, 10, 10, dtype=torch.float64).requires_grad_()
    ours = winograd_conv3x3(x, winograd_filters(weight, 4), None, residual=shortcut, relu=True)
    expected = (F.conv2d(x, weight, padding=1) + shortcut).relu()
    assert_values_and_gradients_equal(ours, expected, [x, weight, shortcut], values_atol=1e-10, gradients_atol=1e-10)
    # An NCHW residual (not the output's layout) is added by its own step.
    nchw = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        filters = winograd_filters(weight.detach().float(), 4)
        ours = winograd_conv3x3(x.detach().float(), filters, residual=nchw)
        expected = winograd_conv3x3(x.detach().float(), filters) + nchw
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_few_channel_f4x4_runs_in_one_native_pass_where_no_gradient_is_needed(fused_calls):
    from seglab.ops.winograd import MAX_FUSED_CHANNEL_PRODUCT, fuses

    torch.manual_seed(0)
    x, shortcut = _channels_last(2, 32, 13, 18), _channels_last(2, 48, 13, 18)
    weight, b = torch.randn(48, 32, 3, 3) / (9 * 32) ** 0.5, torch.randn(48)
    filters = winograd_filters(weight, 4)
    expected = (F.conv2d(x.double(), weight.double(), b.double(), padding=1) + shortcut.double()).relu()
    with torch.no_grad():
        ours = winograd_conv3x3(x, filters, b, residual=shortcut, relu=True)
    assert fused_calls == [(32, 48)] and ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=2e-5 * expected.abs().max().item())
    # With gradients, F(6x6), a dilation, 24 output channels (not whole vectors) or wider
    # products: the separate passes.
    fused_calls.clear()
    winograd_conv3x3(x, filters.requires_grad_(), b).sum().backward()
    with torch.no_grad():
        winograd_conv3x3(x, winograd_filters(weight, 6), b)
        winograd_conv3x3(x, filters, b, dilation=2)
        winograd_conv3x3(x, winograd_filters(weight[:24], 4))
        wide = torch.randn(128, 128, 3, 3)
        winograd_conv3x3(_channels_last(1, 128, 8, 8), winograd_filters(wide, 4))
    assert fused_calls == [] and filters.grad is not None
    assert fuses(128, 64, 1) and not fuses(128, 128, 1) and 128 * 64 == MAX_FUSED_CHANNEL_PRODUCT


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
@pytest.mark.parametrize("tile", OUTPUT_TILES)
@pytest.mark.parametrize("dilation", [1, 5])
def test_weight_gradient_alone_is_the_convolutions(tile, dilation):
    """The filters' gradient without the forward (for a convolution whose forward ran
    otherwise), against float64 autograd; maps that fill no whole number of tiles."""
    torch.manual_seed(0)
    x = torch.randn(2, 24, 19, 23, dtype=torch.float64)
    weight = torch.randn(16, 24, 3, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 16, 19, 23, dtype=torch.float64)
    expected, = torch.autograd.grad(F.conv2d(x, weight, padding=dilation, dilation=dilation), weight, upstream)
    nhwc = [t.float().permute(0, 2, 3, 1).contiguous() for t in (x, upstream)]
    got = winograd_weight_gradient(*nhwc, tile, dilation)
    assert got.shape == weight.shape and got.dtype == torch.float32
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16 if tensor.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
@pytest.mark.parametrize("tile, dtype", [(2, torch.float32), (2, torch.bfloat16), (3, torch.float32), (4, torch.float32),
                                         (6, torch.float32)])
@pytest.mark.parametrize("shape", [(64, 48, 3, 3), (40, 20, 3, 3), (32, 16, 3, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_native_filter_transform_gives_the_operators_bits_both_ways(tile, dtype, shape, channels_last):
    """The native transform of a float32 weight (bf16 filters: of the weight cast to bf16, as
    autocast casts it) against the operators' transform, forward and backward, bit for bit and
    in the weight's layout: whole and partial blocks of output channels, input channels in and
    out of 16-channel vectors; magnitudes spread wide, so that sums that round would show."""
    from seglab.ops.winograd import _filters_by_products
    torch.manual_seed(0)
    weight = torch.randn(shape) * torch.rand(shape) ** 8
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    ours, theirs = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    got, expected = winograd_filters(ours, tile, dtype), _filters_by_products(theirs.to(dtype), tile)
    assert got.dtype == expected.dtype == dtype and torch.equal(_bits(got), _bits(expected))
    upstream = torch.randn(expected.shape).to(dtype)
    got.backward(upstream)
    expected.backward(upstream)
    assert ours.grad.stride() == theirs.grad.stride() and torch.equal(_bits(ours.grad), _bits(theirs.grad))


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
def test_the_native_filter_transform_keeps_to_what_it_takes(monkeypatch):
    """Weights other than float32 on the CPU, larger tiles in bf16 and traced calls take the
    operators; a filter of another size is refused in one line either way."""
    import seglab.ops.winograd as winograd
    calls = []
    monkeypatch.setattr(native, "winograd_filters", lambda *args, **kwargs: calls.append(args) or None)
    weight = torch.randn(16, 8, 3, 3)
    for call in (lambda: winograd_filters(weight.double(), 4), lambda: winograd_filters(weight.bfloat16(), 2),
                 lambda: winograd_filters(weight, 4, torch.bfloat16)):
        assert call() is not None
    monkeypatch.setattr(winograd, "being_traced", lambda: True)
    assert winograd_filters(weight, 2) is not None and calls == []
    with pytest.raises(ValueError, match="3x3"):
        winograd_filters(torch.randn(16, 8, 5, 5), 2)
