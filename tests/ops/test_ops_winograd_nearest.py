"""Winograd on the upsampled grid of a U-Net decoder step (seglab.ops.winograd_nearest): the
convolution over cat([nearest_upsample(x), skip]) against float64, forward and gradients, by
the native kernels and by the upsampled map, and its bad arguments."""
import pytest
import torch
import torch.nn.functional as F

import seglab.ops.winograd_nearest as winograd_nearest
from seglab.ops import native
from seglab.ops.winograd import winograd_filters
from seglab.ops.winograd_nearest import UPSAMPLED_TILES, winograd_conv3x3_of_nearest2x


def _reference(x: torch.Tensor, skip: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    upsampled = F.interpolate(x, scale_factor=2, mode="nearest")
    return F.conv2d(upsampled if skip is None else torch.cat([upsampled, skip], 1), weight, bias, padding=1)


def _case(skip_channels: int, height: int = 5, width: int = 7, seed: int = 0):
    """x (2 x 6 x H x W), a skip of the upsampled size or None, weight, bias, output gradient."""
    torch.manual_seed(seed)
    x = torch.randn(2, 6, height, width).contiguous(memory_format=torch.channels_last)
    skip = torch.randn(2, skip_channels, 2 * height, 2 * width) if skip_channels else None
    weight, bias = torch.randn(5, 6 + skip_channels, 3, 3) * 0.2, torch.randn(5)
    return x, skip, weight, bias, torch.randn(2, 5, 2 * height, 2 * width)


def _errors(tile: int, skip_channels: int, height: int = 5, width: int = 7) -> list[float]:
    """Largest errors of the output and of x's, the skip's, the weight's and the bias's
    gradients, relative to the largest float64 value of each."""
    x, skip, weight, bias, grad = _case(skip_channels, height, width)
    leaves = [t for t in (x, skip, weight, bias) if t is not None]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ours = [t.detach().clone().requires_grad_() for t in leaves]
    if skip is None:
        exact.insert(1, None)
        ours.insert(1, None)
    expected = _reference(*exact)
    expected.backward(grad.double())
    out = winograd_conv3x3_of_nearest2x(ours[0], ours[1], winograd_filters(ours[2], tile), ours[3])
    assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last)
    out.backward(grad)
    pairs = [(out, expected)] + [(a.grad, b.grad) for a, b in zip(ours, exact) if a is not None]
    return [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in pairs]


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
def test_the_upsampled_tiles_are_gathered_from_x_by_kernels_of_their_own():
    for tile in UPSAMPLED_TILES:
        matrix, gradient_matrix = winograd_nearest._upsampled_matrices(tile)
        assert tuple(matrix.shape) == (tile + 2, tile // 2 + 2)
        assert torch.equal(gradient_matrix, matrix.t())
        assert native.compiled_in(matrix, "gather") and native.compiled_in(gradient_matrix, "scatter")


@pytest.mark.skipif(not native.available(), reason=f"the native kernels are not available: {native.unavailable_reason()}")
@pytest.mark.parametrize("tile", UPSAMPLED_TILES)
def test_the_general_kernels_of_those_sides_agree_with_the_compiled_in_ones(tile):
    torch.manual_seed(0)
    matrix, gradient_matrix = winograd_nearest._upsampled_matrices(tile)
    nhwc = torch.randn(2, 7, 5, 12)
    runs = [native.gather_tiles(nhwc, matrix, step=tile // 2, pad=1, specialised=s) for s in (True, False)]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)
    added = [native.scatter_tiles(runs[0], gradient_matrix, (2, 7, 5), step=tile // 2, pad=1,
                                  accumulate_into=torch.zeros(2, 7, 5, 12), specialised=s) for s in (True, False)]
    torch.testing.assert_close(added[0], added[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tile", UPSAMPLED_TILES)
@pytest.mark.parametrize("skip_channels", [0, 4])
@pytest.mark.parametrize("size", [(5, 7), (1, 1), (6, 3)])
def test_the_convolution_and_its_gradients_match_float64(tile, skip_channels, size):
    # Winograd's own rounding: ~1e-5 of the largest value with F(4x4) and F(6x6) (docs).
    for error in _errors(tile, skip_channels, *size):
        assert error < 5e-5


def test_without_the_native_kernels_it_computes_through_the_upsampled_map(monkeypatch):
    x, skip, weight, bias, _ = _case(4)
    filters = winograd_filters(weight, 4)
    native_out = winograd_conv3x3_of_nearest2x(x, skip, filters, bias)
    monkeypatch.setattr(winograd_nearest, "runs_natively", lambda *args: False)
    through_the_map = winograd_conv3x3_of_nearest2x(x, skip, filters, bias)
    torch.testing.assert_close(through_the_map, native_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(through_the_map, _reference(x, skip, weight, bias), atol=1e-4, rtol=1e-4)
    # F(2x2)'s filters (not among UPSAMPLED_TILES) go the same way.
    monkeypatch.undo()
    torch.testing.assert_close(winograd_conv3x3_of_nearest2x(x, skip, winograd_filters(weight, 2), bias),
                               _reference(x, skip, weight, bias), atol=1e-4, rtol=1e-4)


def test_bad_arguments_get_one_clear_error():
    x, skip, weight, bias, _ = _case(4)
    with pytest.raises(ValueError, match=r"do not take 6 \+ 3 input channels"):
        winograd_conv3x3_of_nearest2x(x, skip[:, :3], winograd_filters(weight, 4), bias)
    with pytest.raises(ValueError, match="is not the 2x upsampling"):
        winograd_conv3x3_of_nearest2x(x, skip[:, :, :-1], winograd_filters(weight, 4), bias)
    with pytest.raises(ValueError, match="Winograd's domain"):
        winograd_conv3x3_of_nearest2x(x, skip, weight, bias)
