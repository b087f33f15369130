"""The native tile transforms (seglab.ops.native): each against a float64 reference, the two as
each other's adjoint, Winograd through them against Winograd through PyTorch's operators, bad
arguments, the threads, and how the library is built, cached and turned off."""
from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from seglab.ops import native
from seglab.ops.winograd import _native_matrices, winograd_conv3x3, winograd_filters

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"the native kernels are not available: {native.unavailable_reason()}")

# (out_side, in_side, step, pad): F(4x4)'s and F(6x6)'s input transforms, their output
# transforms' gradients (gather); their output transforms, their input transforms' gradients (scatter).
GATHERS = [(6, 6, 4, 1), (8, 8, 6, 1), (6, 4, 4, 0), (8, 6, 6, 0)]
SCATTERS = [(4, 6, 4, 0), (6, 8, 6, 0), (6, 6, 4, 1), (8, 8, 6, 1)]


def _windows(nhwc: torch.Tensor, side: int, step: int, pad: int) -> torch.Tensor:
    """side x side x windows x C: the windows `gather_tiles` reads, zeros outside the map."""
    n, height, width, _ = nhwc.shape
    rows, cols = -(-height // step), -(-width // step)
    padded = F.pad(nhwc, (0, 0, pad, (cols - 1) * step + side - width - pad,
                          pad, (rows - 1) * step + side - height - pad))
    windows = padded.unfold(1, side, step).unfold(2, side, step)  # N x rows x cols x C x side x side
    return windows.permute(4, 5, 0, 1, 2, 3).reshape(side, side, n * rows * cols, -1)


def _matrix(kind: str, out_side: int, in_side: int, step: int, pad: int, which: str) -> torch.Tensor:
    """A random matrix (the general kernels), or Winograd's of that role (a kernel of its own)."""
    if which == "random":
        matrix = torch.randn(out_side, in_side)
        assert not native.compiled_in(matrix, kind)
        return matrix
    b_t, b, a_t, a = _native_matrices(step)
    matrix = (b_t if pad else a) if kind == "gather" else (b if pad else a_t)
    assert tuple(matrix.shape) == (out_side, in_side) and native.compiled_in(matrix, kind)
    return matrix


@pytest.mark.parametrize("out_side, in_side, step, pad", GATHERS)
# partial vectors of channels alone (11, 3), whole ones (16), whole ones and then a partial one (27)
@pytest.mark.parametrize("shape", [(2, 9, 14, 11), (1, 8, 8, 16), (1, 1, 1, 3), (1, 5, 6, 27)])
@pytest.mark.parametrize("which", ["random", "winograd"])
def test_gather_transforms_every_window_of_the_map(out_side, in_side, step, pad, shape, which):
    torch.manual_seed(0)
    nhwc, matrix = torch.randn(shape), _matrix("gather", out_side, in_side, step, pad, which)
    got = native.gather_tiles(nhwc, matrix, step=step, pad=pad)
    windows = _windows(nhwc.double(), in_side, step, pad)
    expected = torch.einsum("ik,jl,klwc->ijwc", matrix.double(), matrix.double(), windows)
    assert got.shape == (out_side * out_side, windows.shape[2], shape[-1])
    torch.testing.assert_close(got.double(), expected.reshape(got.shape), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("out_side, in_side, step, pad", SCATTERS)
@pytest.mark.parametrize("shape", [(2, 9, 14, 11), (1, 12, 12, 8), (1, 5, 6, 27)])
@pytest.mark.parametrize("which", ["random", "winograd"])
def test_scatter_is_the_adjoint_of_gather(out_side, in_side, step, pad, shape, which):
    torch.manual_seed(0)
    n, height, width, channels = shape
    grid = (-(-height // step), -(-width // step))
    matrix = _matrix("scatter", out_side, in_side, step, pad, which)
    tiles = torch.randn(in_side * in_side, n * grid[0] * grid[1], channels)
    if out_side > step:  # overlapping windows: added into a map
        placed = native.scatter_tiles(tiles, matrix, (n, height, width), step=step, pad=pad,
                                      accumulate_into=torch.zeros(shape))
    else:
        placed = native.scatter_tiles(tiles, matrix, (n, height, width), step=step, pad=pad)
    probe = torch.randn(shape)
    gathered = native.gather_tiles(probe, matrix.t().contiguous(), step=step, pad=pad)
    # <scatter_L(T), P> = <T, gather_{L^T}(P)>
    lhs, rhs = (placed.double() * probe.double()).sum(), (tiles.double() * gathered.double()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("out_side, in_side, step, pad", SCATTERS)
def test_a_compiled_in_scatter_places_each_tile_like_the_general_kernel(out_side, in_side, step, pad):
    torch.manual_seed(0)
    shape, channels = (2, 13, 10), 11  # ragged tiles at the edges, a partial vector of channels
    grid = (-(-shape[1] // step), -(-shape[2] // step))
    matrix = _matrix("scatter", out_side, in_side, step, pad, "winograd")
    tiles = torch.randn(in_side * in_side, shape[0] * grid[0] * grid[1], channels)
    start, bias = torch.randn(*shape, channels), torch.randn(channels)
    if out_side > step:
        runs = [native.scatter_tiles(tiles, matrix, shape, step=step, pad=pad, accumulate_into=start.clone(),
                                     specialised=specialised) for specialised in (True, False)]
    else:
        runs = [native.scatter_tiles(tiles, matrix, shape, step=step, pad=pad, bias=bias, specialised=specialised)
                for specialised in (True, False)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-5 * runs[1].abs().max().item())


def test_scatter_writes_the_bias_and_adds_into_a_map():
    torch.manual_seed(0)
    matrix, tiles, bias = torch.randn(4, 6), torch.randn(36, 2 * 3 * 2, 10), torch.randn(10)  # 3 x 2 tiles each
    shape = (2, 10, 7)
    plain = native.scatter_tiles(tiles, matrix, shape, step=4, pad=0)
    torch.testing.assert_close(native.scatter_tiles(tiles, matrix, shape, step=4, pad=0, bias=bias),
                               plain + bias)
    start = torch.randn(*shape, 10)
    added = native.scatter_tiles(tiles, matrix, shape, step=4, pad=0, accumulate_into=start.clone())
    torch.testing.assert_close(added, start + plain)


F2X2_GATHER, F2X2_SCATTER = (4, 4, 2, 1), (2, 4, 2, 0)  # bf16 inference's two transforms


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16)


@pytest.mark.parametrize("out_side, in_side, step, pad", [F2X2_GATHER, *GATHERS])
@pytest.mark.parametrize("which", ["random", "winograd"])
@pytest.mark.parametrize("channels", [16, 11, 27])  # whole vectors, a partial one, both
def test_a_bf16_gather_is_the_float32_one_rounded_to_bf16_bit_for_bit(out_side, in_side, step, pad, which,
                                                                      channels):
    torch.manual_seed(0)
    nhwc, matrix = torch.randn(2, 9, 14, channels).bfloat16(), _matrix("gather", out_side, in_side, step, pad, which)
    got = native.gather_tiles(nhwc, matrix, step=step, pad=pad)
    expected = native.gather_tiles(nhwc.float(), matrix, step=step, pad=pad).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("out_side, in_side, step, pad", [F2X2_SCATTER, *SCATTERS])
@pytest.mark.parametrize("which", ["random", "winograd"])
@pytest.mark.parametrize("channels", [11, 27])
def test_a_bf16_scatter_is_the_float32_one_rounded_to_bf16(out_side, in_side, step, pad, which, channels):
    torch.manual_seed(0)
    shape = (2, 13, 10)
    grid = (-(-shape[1] // step), -(-shape[2] // step))
    matrix = _matrix("scatter", out_side, in_side, step, pad, which)
    tiles = torch.randn(in_side * in_side, shape[0] * grid[0] * grid[1], channels).bfloat16()
    if out_side > step:
        # Overlapping windows add into a bf16 map: rounded after each tile, so only close.
        start = torch.randn(*shape, channels).bfloat16()
        got = native.scatter_tiles(tiles, matrix, shape, step=step, pad=pad, accumulate_into=start.clone())
        expected = native.scatter_tiles(tiles.float(), matrix, shape, step=step, pad=pad,
                                        accumulate_into=start.float())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=2e-2 * expected.abs().max().item())
        return
    bias = torch.randn(channels)
    got = native.scatter_tiles(tiles, matrix, shape, step=step, pad=pad, bias=bias)
    expected = native.scatter_tiles(tiles.float(), matrix, shape, step=step, pad=pad, bias=bias).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(_bits(got), _bits(expected))


def test_bf16_rounding_is_pytorchs_for_ties_overflow_and_infinities_and_keeps_nans():
    # The identity with its first entry 1 + 2^-8 scales each window's first row and column once:
    # powers of two land exactly half way between two bf16 values (ties go to the even one), the
    # largest bf16 values overflow.
    special = [1.0, 2.0, 0.5, -4.0, 1.0078125, 3.0, 3.3895e38, -3.3895e38, float("inf"), float("-inf"),
               float("nan"), 0.0, -0.0, 1e-40, 5.9e-39, -7.0]
    nhwc = torch.tensor(special).repeat(16).view(1, 4, 4, 16).bfloat16()
    matrix = torch.eye(4)
    matrix[0, 0] += 2**-8
    got = native.gather_tiles(nhwc, matrix, step=4, pad=0).float()
    expected = native.gather_tiles(nhwc.float(), matrix, step=4, pad=0).bfloat16().float()
    nan = expected.isnan()  # (PyTorch's NaN bits differ between its own code paths)
    assert nan.any() and torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32))
    # Tile entry (0, 1) of the one window: its first row, scaled once.
    assert got[1, 0, 0] == 1.0 and got[1, 0, 1] == 2.0 and got[1, 0, 3] == -4.0  # ties to even
    assert got[1, 0, 4] == 1.015625  # 1.0078125 (1 + 2^-7) scaled: above the half way, up
    assert got[1, 0, 6] == float("inf") and got[1, 0, 7] == float("-inf")  # finite in float32


def test_the_same_results_on_one_thread_and_on_pytorchs_or_our_own_threads():
    from ctypes import c_void_p

    torch.manual_seed(0)
    nhwc, matrix = torch.randn(3, 21, 17, 24), torch.randn(8, 8)
    shape = (3, 21, 17)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        gathered = native.gather_tiles(nhwc, matrix, step=6, pad=1)
        return gathered, native.scatter_tiles(gathered, matrix.t().contiguous(), shape, step=6, pad=1,
                                              accumulate_into=torch.zeros_like(nhwc))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = both()
        torch.set_num_threads(max(threads, 2))
        pooled = both()
        native._load().seglab_use_openmp(c_void_p(), c_void_p(), c_void_p())  # threads of our own
        own = both()
    finally:
        torch.set_num_threads(threads)
        openmp = native._torch_openmp()
        if openmp is not None:
            native._load().seglab_use_openmp(*openmp)
    for results in (pooled, own):
        for a, b in zip(single, results):
            assert torch.equal(a, b)


@pytest.mark.parametrize("tile", [2, 4, 6])  # F(2x2): one autograd function, `_NativeF2x2`
@pytest.mark.parametrize("dilation, size", [(1, (12, 12)), (1, (9, 14)), (1, (1, 5)), (2, (13, 10)), (3, (7, 7))])
@pytest.mark.parametrize("bias", [False, True])
def test_winograd_through_them_equals_winograd_through_pytorchs_operators(tile, dilation, size, bias, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 12, *size).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(10, 12, 3, 3) / 10).requires_grad_()
    b = torch.randn(10, requires_grad=True) if bias else None
    inputs = [x, weight] + ([b] if bias else [])
    upstream = torch.randn(2, 10, *size)

    def run() -> list[torch.Tensor]:
        out = winograd_conv3x3(x, winograd_filters(weight, tile), b, dilation)
        assert out.is_contiguous(memory_format=torch.channels_last)
        return [out, *torch.autograd.grad((out * upstream).sum(), inputs)]

    ours = run()
    monkeypatch.setattr(native, "available", lambda: False)
    for a, e in zip(ours, run()):  # both round differently: to Winograd's float32 error, ~1e-5 of the largest
        torch.testing.assert_close(a, e, rtol=0, atol=3e-5 * e.abs().max().item())
    expected = F.conv2d(x, weight, b, padding=dilation, dilation=dilation)
    torch.testing.assert_close(ours[0], expected, rtol=0, atol=3e-5 * expected.abs().max().item())


# (The dilated path adds the bias after its phases: only undilated calls take one here.)
@pytest.mark.parametrize("dilation, size, bias", [(1, (12, 12), True), (1, (9, 14), False), (1, (9, 14), True),
                                                  (2, (13, 10), False), (3, (8, 11), False)])
def test_bf16_winograd_reads_and_writes_bf16_with_the_float32_transforms_values(dilation, size, bias):
    # The kernels' own bf16 reads and writes give, bit for bit, float32 transforms of a float32
    # copy of the map, rounded to bf16 tiles, bf16 products, float32 output transform, rounded.
    torch.manual_seed(0)
    x = torch.randn(2, 24, *size).bfloat16().contiguous(memory_format=torch.channels_last)
    filters = winograd_filters(torch.randn(20, 24, 3, 3) / 10, 2).bfloat16()
    b = torch.randn(20) if bias else None
    b_t, _, a_t, _ = _native_matrices(2)

    def with_float32_copies(nhwc: torch.Tensor) -> torch.Tensor:
        n, height, width, _ = nhwc.shape
        tiles = native.gather_tiles(nhwc.float().contiguous(), b_t, step=2, pad=1).bfloat16()
        products = torch.bmm(tiles, filters).float()
        return native.scatter_tiles(products, a_t, (n, height, width), step=2, pad=0, bias=b).bfloat16()

    got = winograd_conv3x3(x, filters, b, dilation)
    nhwc = x.permute(0, 2, 3, 1)
    if dilation == 1:
        expected = with_float32_copies(nhwc)
    else:  # each phase by itself
        expected = torch.empty_like(nhwc[..., :20])
        for i in range(dilation):
            for j in range(dilation):
                expected[:, i::dilation, j::dilation] = with_float32_copies(nhwc[:, i::dilation, j::dilation])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.permute(0, 2, 3, 1).view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("dilation, size", [(1, (10, 12)), (1, (9, 7)), (2, (13, 10))])
def test_bf16_winograd_gradients_stay_near_a_direct_bf16_convolutions(dilation, size):
    # bf16 training's F(2x2): the filters' gradient from the saved bf16 tiles, the input's as a
    # forward convolution with the rotated filters, each rounded to bf16 once.
    torch.manual_seed(0)
    x, weight = torch.randn(2, 32, *size).contiguous(memory_format=torch.channels_last), torch.randn(24, 32, 3, 3) / 17
    bias, upstream = torch.randn(24), torch.randn(2, 24, *size).contiguous(memory_format=torch.channels_last)

    def run(dtype: torch.dtype, convolution) -> list[torch.Tensor]:
        inputs = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
        out = convolution(*inputs)
        return [out, *torch.autograd.grad(out, inputs, upstream.to(dtype))]

    def winograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return winograd_conv3x3(x, winograd_filters(weight, 2), bias, dilation)

    def direct(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)

    reference = run(torch.float64, direct)
    for ours, theirs, expected in zip(run(torch.bfloat16, winograd), run(torch.bfloat16, direct), reference):
        assert ours.dtype == torch.bfloat16
        error, direct_error = ((t.double() - expected).abs().max() for t in (ours, theirs))
        # Measured 1-2x the direct convolution's error.
        assert error <= 3 * direct_error and error < 2e-2 * expected.abs().max()


def test_bad_arguments_get_one_clear_error():
    map_, matrix = torch.randn(1, 8, 8, 4), torch.randn(6, 6)
    with pytest.raises(ValueError, match="the map must be a contiguous float32 or bfloat16 CPU tensor"):
        native.gather_tiles(map_.double(), matrix, step=4, pad=1)
    with pytest.raises(ValueError, match="contiguous float32 or bfloat16 CPU tensor"):
        native.gather_tiles(map_.transpose(1, 2), matrix, step=4, pad=1)
    with pytest.raises(ValueError, match="the matrix must be a contiguous float32 CPU tensor"):
        native.gather_tiles(map_.bfloat16(), matrix.bfloat16(), step=4, pad=1)
    with pytest.raises(ValueError, match="no native kernel for 7 x 7"):
        native.gather_tiles(map_, torch.randn(7, 7), step=5, pad=1)
    tiles = native.gather_tiles(map_, matrix, step=4, pad=1)
    with pytest.raises(ValueError, match="added into a map"):
        native.scatter_tiles(tiles, matrix, (1, 8, 8), step=4, pad=1)
    with pytest.raises(ValueError, match="do not fit"):
        native.scatter_tiles(tiles, matrix, (1, 12, 8), step=4, pad=1, accumulate_into=torch.zeros(1, 12, 8, 4))
    with pytest.raises(ValueError, match="cannot add 4-channel tiles"):
        native.scatter_tiles(tiles, matrix, (1, 8, 8), step=4, pad=1, accumulate_into=torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="the map to add into must be a contiguous float32 CPU tensor"):
        native.scatter_tiles(tiles, matrix, (1, 8, 8), step=4, pad=1,
                             accumulate_into=torch.zeros(1, 8, 8, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="planes must each be contiguous"):
        native.scatter_tiles(tiles.transpose(1, 2).contiguous().transpose(1, 2), matrix, (1, 8, 8), step=4, pad=1,
                             accumulate_into=torch.zeros(1, 8, 8, 4))
    with pytest.raises(ValueError, match="planes x windows x channels"):
        native.scatter_tiles(tiles[0], matrix, (1, 8, 8), step=4, pad=1, accumulate_into=torch.zeros(1, 8, 8, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_adds_a_residual_and_applies_the_relu_in_its_pass(dtype):
    torch.manual_seed(0)
    matrix = _native_matrices(4)[2]  # F(4x4)'s A^T
    tiles = torch.randn(36, 2 * 3 * 4, 24).to(dtype)
    residual = torch.randn(2, 11, 14, 24).to(dtype)
    bias = torch.randn(24)
    plain = native.scatter_tiles(tiles, matrix, (2, 11, 14), step=4, pad=0, bias=bias)
    fused = native.scatter_tiles(tiles, matrix, (2, 11, 14), step=4, pad=0, bias=bias, residual=residual, relu=True)
    expected = (plain.float() + residual.float()).relu()
    tolerance = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(fused.float(), expected, **tolerance)
    assert (fused == 0).any()
    # The ReLU alone keeps NaN, as torch.relu does.
    tiles[:, 0, 0] = float("nan")
    assert torch.isnan(native.scatter_tiles(tiles, matrix, (2, 11, 14), step=4, pad=0, relu=True)[0, 0, 0, 0])


def test_scatter_refuses_an_epilogue_it_cannot_apply():
    tiles, matrix = torch.randn(36, 4, 8), _native_matrices(4)[2]
    with pytest.raises(ValueError, match="does not fit the 1 x 8 x 8 x 8 map"):
        native.scatter_tiles(tiles, matrix, (1, 8, 8), step=4, pad=0, residual=torch.zeros(1, 8, 8, 7))
    with pytest.raises(ValueError, match="the residual must be a contiguous float32 CPU tensor"):
        native.scatter_tiles(tiles, matrix, (1, 8, 8), step=4, pad=0, residual=torch.zeros(1, 8, 8, 8).double())
    overlapping = torch.randn(36, 9, 8)
    with pytest.raises(ValueError, match="not with accumulate_into"):
        native.scatter_tiles(overlapping, torch.randn(6, 6), (1, 8, 8), step=3, pad=1, relu=True,
                             accumulate_into=torch.zeros(1, 8, 8, 8))


@pytest.mark.parametrize("dilation, size", [(2, (13, 10)), (3, (7, 11)), (4, (16, 16))])
@pytest.mark.parametrize("tile", [4, 6])
def test_dilated_windows_are_each_phases_own_in_place(dilation, size, tile):
    # A d-dilated convolution's windows: those of each of the map's d x d phases, gathered and
    # scattered in place; bit for bit what the kernels give on each phase copied out.
    torch.manual_seed(0)
    b_t, _, a_t, _ = _native_matrices(tile)
    side = tile + 2
    nhwc = torch.randn(2, *size, 8)
    phases = [nhwc[:, p::dilation, q::dilation] for p in range(dilation) for q in range(dilation)]
    height, width = -(-size[0] // dilation), -(-size[1] // dilation)  # every phase padded to the largest
    padded = [F.pad(phase, (0, 0, 0, width - phase.shape[2], 0, height - phase.shape[1])).contiguous()
              for phase in phases]
    gathered = native.gather_tiles(nhwc, b_t, step=tile, pad=1, dilation=dilation)
    expected = torch.stack([native.gather_tiles(phase, b_t, step=tile, pad=1).reshape(side * side, 2, -1, 8)
                            for phase in padded], 2)  # ordered image, phase, window
    assert torch.equal(gathered, expected.view(gathered.shape))
    # The output transform writes each phase's outputs onto its own pixels, cropped to the map.
    products = torch.randn(gathered.shape)
    written = native.scatter_tiles(products, a_t, (2, *size), step=tile, pad=0, dilation=dilation)
    per_phase = products.view(side * side, 2, dilation * dilation, -1, 8)
    for index, phase in enumerate(phases):
        p, q = divmod(index, dilation)
        tiles = per_phase[:, :, index].contiguous().view(side * side, -1, 8)
        own = native.scatter_tiles(tiles, a_t, (2, height, width), step=tile, pad=0)
        assert torch.equal(written[:, p::dilation, q::dilation], own[:, :phase.shape[1], :phase.shape[2]])
    other = dilation + 1
    with pytest.raises(ValueError, match=rf"on a 2 x {other * other} phases x"):
        native.scatter_tiles(products, a_t, (2, *size), step=tile, pad=0, dilation=other)
    with pytest.raises(ValueError, match="the dilation must be at least 1"):
        native.gather_tiles(nhwc, b_t, step=tile, pad=1, dilation=0)


def test_add_upsampled_refuses_maps_it_cannot_add_with_one_clear_error():
    out = torch.zeros(2, 8, 8, 4)
    with pytest.raises(ValueError, match="the map to add into must be a contiguous float32 or bfloat16"):
        native.add_upsampled_(out.transpose(1, 2), [torch.zeros(2, 4, 4, 4)])
    with pytest.raises(ValueError, match="must be N x H x W x C"):
        native.add_upsampled_(out[0], [torch.zeros(4, 4, 4)])
    with pytest.raises(ValueError, match=r"map 1 to upsample must be 2 x h x w x 4, not of shape \(2, 4, 4, 3\)"):
        native.add_upsampled_(out, [torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 3)])
    with pytest.raises(ValueError, match="map 0 to upsample must be 2 x h x w x 4"):
        native.add_upsampled_(out, [torch.zeros(2, 0, 4, 4)])
    with pytest.raises(ValueError, match="map 0 to upsample must be a contiguous float32 CPU tensor"):
        native.add_upsampled_(out, [torch.zeros(2, 4, 4, 4, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="at most 8 maps"):
        native.add_upsampled_(out, [torch.zeros(2, 4, 4, 4)] * 9)
    assert native.add_upsampled_(out, []) is out and not out.any()


def test_add_upsampled_gives_the_same_bits_on_one_thread_and_on_two():
    torch.manual_seed(0)
    out, parts = torch.randn(3, 17, 13, 40), [torch.randn(3, 5, 4, 40), torch.randn(3, 9, 7, 40)]
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            results.append(native.add_upsampled_(out.clone(), parts, relu=True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)


def _fused_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    b_t, _, a_t, _ = _native_matrices(4)
    return b_t, a_t


# Partial vectors of input channels (24), partial tiles (37 x 37, 5 x 3), one pixel, a batch.
@pytest.mark.parametrize("shape", [(1, 16, 16, 12, 12), (2, 24, 48, 37, 37), (1, 64, 64, 5, 3), (3, 8, 32, 1, 1)])
@pytest.mark.parametrize("bias, residual, relu", [(False, False, False), (True, False, True), (True, True, True),
                                                  (False, True, False)])
def test_winograd_fused_equals_the_convolution(shape, bias, residual, relu):
    torch.manual_seed(0)
    n, in_channels, out_channels, height, width = shape
    x = torch.randn(n, height, width, in_channels)
    weight = torch.randn(out_channels, in_channels, 3, 3) / (9 * in_channels) ** 0.5
    b = torch.randn(out_channels) if bias else None
    shortcut = torch.randn(n, height, width, out_channels) if residual else None
    result = native.winograd_fused(x, winograd_filters(weight, 4), *_fused_matrices(), bias=b, residual=shortcut,
                                   relu=relu)
    expected = F.conv2d(x.permute(0, 3, 1, 2).double(), weight.double(), None if b is None else b.double(), padding=1)
    expected = expected.permute(0, 2, 3, 1) + (0 if shortcut is None else shortcut.double())
    expected = expected.relu() if relu else expected
    assert result.shape == (n, height, width, out_channels) and result.is_contiguous()
    # F(4x4)'s float32 rounding: a few units in the last place of the largest output
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=2e-5 * expected.abs().max().item())


def test_winograd_fused_gives_the_same_bits_on_one_thread_and_on_two():
    torch.manual_seed(0)
    x, weight = torch.randn(2, 21, 14, 32), torch.randn(16, 32, 3, 3)
    filters, results = winograd_filters(weight, 4), []
    threads = torch.get_num_threads()
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            results.append(native.winograd_fused(x, filters, *_fused_matrices(), relu=True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)


def test_winograd_fused_refuses_what_it_cannot_compute_with_one_clear_error():
    x, filters = torch.zeros(1, 8, 8, 16), winograd_filters(torch.zeros(32, 16, 3, 3), 4)
    b_t, a_t = _fused_matrices()
    with pytest.raises(ValueError, match="a multiple of 16 output channels, not 24"):
        native.winograd_fused(x, winograd_filters(torch.zeros(24, 16, 3, 3), 4), b_t, a_t)
    with pytest.raises(ValueError, match="36 x C x C_out filters"):
        native.winograd_fused(x, winograd_filters(torch.zeros(32, 16, 3, 3), 6), b_t, a_t)
    with pytest.raises(ValueError, match="not the matrices compiled in"):
        native.winograd_fused(x, filters, b_t * 2, a_t)
    with pytest.raises(ValueError, match="a residual of shape"):
        native.winograd_fused(x, filters, b_t, a_t, residual=torch.zeros(1, 8, 8, 16))
    with pytest.raises(ValueError, match="a bias of shape"):
        native.winograd_fused(x, filters, b_t, a_t, bias=torch.zeros(16))
    with pytest.raises(ValueError, match="the map must be a contiguous float32"):
        native.winograd_fused(x.to(torch.bfloat16), filters, b_t, a_t)
    with pytest.raises(ValueError, match="takes F\\(4x4\\)'s 6 x 6 B\\^T and 4 x 6 A\\^T"):
        native.specialise(fused=(a_t, b_t))


@pytest.mark.parametrize("sizes", [((16, 16), (64, 64)), ((64, 64), (512, 512)), ((7, 45), (21, 90)),
                                   ((5, 9), (17, 13)), ((40, 30), (17, 13)), ((1, 1), (4, 6)), ((3, 4), (3, 4))])
@pytest.mark.parametrize("channels", [21, 1, 40])
def test_resize_bilinear_equals_f_interpolate(sizes, channels):
    """Whole factors (class scores at strides 4 and 8), other ratios, shrinking, one pixel, the same size."""
    torch.manual_seed(0)
    (h, w), size = sizes
    x = torch.randn(2, channels, h, w).contiguous(memory_format=torch.channels_last)
    result = native.resize_bilinear(x.permute(0, 2, 3, 1).contiguous(), size)
    assert result.shape == (2, *size, channels) and result.is_contiguous()
    # F.interpolate's float32 source positions and weights, its order of blends (up to fused multiply-adds)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(result.permute(0, 3, 1, 2), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sizes", [((16, 16), (64, 64)), ((64, 64), (512, 512)), ((7, 45), (21, 90)),
                                   ((5, 9), (17, 13)), ((40, 30), (17, 13)), ((1, 1), (4, 6)), ((3, 4), (3, 4))])
@pytest.mark.parametrize("channels", [21, 1, 40])
def test_resize_bilinear_backward_equals_the_gradient_of_f_interpolate(sizes, channels):
    """Whole factors, other ratios, shrinking (a source pixel read by no output pixel gets 0),
    one pixel, the same size; against float64 autograd."""
    torch.manual_seed(0)
    (h, w), size = sizes
    x = torch.randn(2, channels, h, w, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, channels, *size, dtype=torch.float64)
    expected, = torch.autograd.grad(F.interpolate(x, size=size, mode="bilinear", align_corners=False), x, grad)
    result = native.resize_bilinear_backward(grad.float().permute(0, 2, 3, 1).contiguous(), (h, w))
    assert result.shape == (2, h, w, channels) and result.is_contiguous() and result.dtype == torch.float32
    # float32 positions and weights (F.interpolate's own for float32 maps) against float64's
    torch.testing.assert_close(result.permute(0, 3, 1, 2).double(), expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("function, shape, size", [(native.resize_bilinear, (3, 11, 9, 21), (47, 37)),
                                                   (native.resize_bilinear_backward, (3, 47, 37, 21), (11, 9))])
def test_resize_bilinear_both_ways_gives_the_same_bits_on_one_thread_and_on_three(function, shape, size):
    """The backward's threads own whole source rows; output rows read across a boundary are
    narrowed by both threads."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(function(x, size))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)


@pytest.mark.parametrize("function, named, shapes", [
    (native.resize_bilinear, "the map to resize", "an N x h x w x C map"),
    (native.resize_bilinear_backward, "the gradient to resize back", "an N x H x W x C gradient")])
def test_resize_bilinear_both_ways_refuses_what_it_cannot_take_with_one_clear_error(function, named, shapes):
    with pytest.raises(ValueError, match=f"{named} must be a contiguous float32 CPU tensor"):
        function(torch.zeros(1, 4, 4, 3, dtype=torch.bfloat16), (8, 8))
    with pytest.raises(ValueError, match=f"{named} must be a contiguous float32"):
        function(torch.zeros(1, 4, 4, 3).transpose(1, 2), (8, 8))
    with pytest.raises(ValueError, match=f"{function.__name__} takes {shapes}"):
        function(torch.zeros(4, 4, 3), (8, 8))
    bad_side = (torch.zeros(1, 0, 4, 3), (8, 8)) if function is native.resize_bilinear else (torch.zeros(1, 8, 8, 3),
                                                                                             (0, 4))
    with pytest.raises(ValueError, match=f"{function.__name__} takes {shapes}"):
        function(*bad_side)


def test_resize_bilinear_both_ways_to_and_from_an_empty_map():
    assert native.resize_bilinear(torch.zeros(1, 4, 4, 3), (0, 8)).shape == (1, 0, 8, 3)
    # Nothing upsampled to an empty map: the source's gradient is zero.
    assert torch.equal(native.resize_bilinear_backward(torch.zeros(1, 0, 8, 3), (4, 4)), torch.zeros(1, 4, 4, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 32, 32, 256), (1, 16, 16, 512), (2, 9, 14, 11), (1, 1, 1, 3)])
def test_gather_spaces_float32_planes_2_mod_4_cache_lines_apart_and_keeps_bf16_ones_contiguous(shape, dtype):
    """Contiguous float32 planes of a power-of-two size would share the L1 cache's sets; bf16
    batched products read spaced planes slowly (`_planes`)."""
    nhwc = torch.randn(shape).to(dtype)
    tiles = native.gather_tiles(nhwc, _native_matrices(4)[0], step=4, pad=1)
    windows, channels = tiles.shape[1:]
    plane_bytes = tiles.stride(0) * tiles.element_size()
    if dtype == torch.bfloat16:
        assert tiles.is_contiguous()
    else:
        assert tiles.stride()[1:] == (channels, 1) and tiles.stride(0) >= windows * channels
        assert plane_bytes % 64 == 0 and plane_bytes // 64 % 4 == 2
        assert tiles.data_ptr() % 64 == 0
    # The same values as laid out contiguously, and the scatter takes either layout.
    torch.testing.assert_close(tiles, native.gather_tiles(nhwc.float(), _native_matrices(4)[0], step=4,
                                                          pad=1).to(dtype), rtol=0, atol=0)
    scatter_matrix = _native_matrices(4)[1]
    starts = [torch.zeros(shape, dtype=dtype) for _ in range(2)]
    for layout, start in zip((tiles, tiles.contiguous()), starts):
        native.scatter_tiles(layout, scatter_matrix, shape[:3], step=4, pad=1, accumulate_into=start)
    torch.testing.assert_close(starts[0], starts[1], rtol=0, atol=0)


def _fresh_process(code: str, **environment: str) -> str:
    return _fresh_run(code, **environment).stdout.strip()


def _fresh_run(code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **environment}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


REPORT = "from seglab.ops import native; print(native.available(), native.unavailable_reason())"


def test_built_once_into_the_cache_and_turned_off_by_the_environment(tmp_path):
    assert _fresh_process(REPORT, SEGLAB_CACHE=str(tmp_path)) == "True None"
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].name.startswith("seglab_native-") and built[0].suffix == ".so"
    inode = built[0].stat().st_ino  # a rebuild is a new file, renamed over it
    assert _fresh_process(REPORT, SEGLAB_CACHE=str(tmp_path)) == "True None"  # loaded, not rebuilt
    assert list((tmp_path / "native").iterdir()) == built and built[0].stat().st_ino == inode
    off = _fresh_run(REPORT, SEGLAB_CACHE=str(tmp_path), SEGLAB_NATIVE="0")
    assert off.stdout.strip() == "False turned off by SEGLAB_NATIVE=0" and "Warning" not in off.stderr  # as asked


def test_a_process_whose_first_native_call_is_cross_entropy_still_builds_winograds_kernels(tmp_path):
    code = ("import torch; from seglab.ops import native; "
            "native.cross_entropy(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)); "
            "from seglab.ops.winograd import OUTPUT_TILES, _native_matrices; "
            "print(all(native.compiled_in(_native_matrices(tile)[0]) for tile in OUTPUT_TILES))")
    assert _fresh_process(code, SEGLAB_CACHE=str(tmp_path)) == "True"


def test_a_new_build_removes_the_libraries_no_process_used_for_a_month(tmp_path):
    cache = tmp_path / "native"
    cache.mkdir()
    month = native.PRUNE_UNUSED_DAYS * 86400
    # (winograd_tiles-*.so: the name of the libraries before the cross-entropy kernel joined them)
    unused, old_unused, recent, other = (cache / "seglab_native-0unused.so", cache / "winograd_tiles-0unused.so",
                                         cache / "seglab_native-1recent.so", cache / "notes.txt")
    for path in (unused, old_unused, recent, other):
        path.write_text("")
    for path, age in ((unused, month + 3600), (old_unused, month + 3600), (recent, month - 3600), (other, 2 * month)):
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime - age))
    assert _fresh_process(REPORT, SEGLAB_CACHE=str(tmp_path)) == "True None"
    left = sorted(path.name for path in cache.iterdir())
    assert unused.name not in left and old_unused.name not in left and recent.name in left and other.name in left
    assert len(left) == 3
    built = next(cache / name for name in left if name not in (recent.name, other.name))
    os.utime(built, (0, 0))  # long unused ...
    assert _fresh_process(REPORT, SEGLAB_CACHE=str(tmp_path)) == "True None"
    assert built.stat().st_mtime > 0  # ... until loaded again


def test_a_failing_compiler_leaves_pytorchs_operators_in_use(tmp_path):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: no such thing' >&2\nexit 1\n")
    failing.chmod(0o755)
    done = _fresh_run(REPORT + "\nimport torch\nfrom seglab.ops.winograd import winograd_conv3x3, winograd_filters\n"
                      "print(winograd_conv3x3(torch.ones(1, 2, 5, 5), winograd_filters(torch.ones(3, 2, 3, 3)))"
                      "[0, :, 2, 2].tolist())", SEGLAB_CACHE=str(tmp_path / "cache"), CC=str(failing))
    first, values = done.stdout.strip().splitlines()
    assert done.stderr.count("RuntimeWarning: seglab's native kernels are not available (") == 1
    assert "cc: no such thing" in done.stderr
    assert first.startswith("False ") and "cc: no such thing" in first
    assert [round(v, 4) for v in eval(values)] == [18.0] * 3  # 2 channels x 9 taps of ones
    assert not list((tmp_path / "cache" / "native").iterdir())  # no half-written library left


def test_an_unusable_cache_leaves_pytorchs_operators_in_use(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    report = _fresh_process(REPORT, SEGLAB_CACHE=str(blocked))
    assert report.startswith("False cannot build in the cache") and "set SEGLAB_CACHE" in report


def _mix_ffn_weights(channels: int, hidden: int) -> dict[str, torch.Tensor]:
    """Random Mix-FFN weights in `native.mix_ffn`'s layout, scaled as trained layers are."""
    return {"fc1_weight": torch.randn(channels, hidden) / channels ** 0.5, "fc1_bias": torch.randn(hidden) / 4,
            "dw_weight": torch.randn(9, hidden) / 3, "dw_bias": torch.randn(hidden) / 4,
            "fc2_weight": torch.randn(hidden, channels) / hidden ** 0.5, "fc2_bias": torch.randn(channels) / 4}


def _mix_ffn_reference(tokens: torch.Tensor, height: int, width: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """fc2(GELU(dwconv3x3(fc1(tokens)))) in float64, by PyTorch's operators."""
    w = {name: value.double() for name, value in weights.items()}
    hidden = w["fc1_bias"].shape[0]
    x = tokens.double() @ w["fc1_weight"] + w["fc1_bias"]  # (float64 tokens stay as they are)
    x = x.reshape(tokens.shape[0], height, width, hidden).permute(0, 3, 1, 2)
    x = F.conv2d(x, w["dw_weight"].t().reshape(hidden, 1, 3, 3), w["dw_bias"], padding=1, groups=hidden)
    x = F.gelu(x).flatten(2).transpose(1, 2)
    return x @ w["fc2_weight"] + w["fc2_bias"]


# MiT's first stage (32 -> 128), rows of a width not a multiple of the kernel's 4 columns or 8
# tokens, one column, one row, one token, a batch of several images, wider channels.
@pytest.mark.parametrize("shape", [(1, 9, 13, 32, 128), (2, 5, 1, 16, 64), (1, 1, 7, 48, 32), (1, 1, 1, 16, 16),
                                   (3, 4, 6, 64, 256), (1, 3, 3, 160, 640)])
@pytest.mark.parametrize("residual, norm", [(False, False), (True, False), (True, True)])
def test_mix_ffn_equals_its_four_operators(shape, residual, norm):
    """(and the LayerNorm before them: the tokens offset and scaled, as a block's input is)"""
    torch.manual_seed(0)
    n, height, width, channels, hidden = shape
    tokens = torch.randn(n, height * width, channels) * 3 + 2
    weights = _mix_ffn_weights(channels, hidden)
    shortcut = torch.randn_like(tokens) if residual else None
    norms = {"norm_weight": torch.rand(channels) + 0.5, "norm_bias": torch.randn(channels) / 4} if norm else {}
    result = native.mix_ffn(tokens, height, width, **weights, **norms, eps=1e-6, residual=shortcut)
    inputs = F.layer_norm(tokens.double(), (channels,), norms["norm_weight"].double(), norms["norm_bias"].double(),
                          eps=1e-6) if norm else tokens
    expected = _mix_ffn_reference(inputs, height, width, weights) + (0 if shortcut is None else shortcut.double())
    assert result.shape == tokens.shape and result.is_contiguous()
    # float32 rounding of sums over C and 4C products, and GELU's erf within 1.5e-7
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=2e-6 * expected.abs().max().item())


def test_mix_ffn_gives_the_same_bits_on_one_thread_and_on_two():
    """Each thread's first row recomputes fc1 of the rows above it: the same values either way."""
    torch.manual_seed(0)
    tokens, weights = torch.randn(3, 7 * 5, 32), _mix_ffn_weights(32, 128)
    norms = {"norm_weight": torch.rand(32), "norm_bias": torch.randn(32)}
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            results.append(native.mix_ffn(tokens, 7, 5, **weights, **norms, residual=tokens))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)


def test_mix_ffn_refuses_what_it_cannot_compute_with_one_clear_error():
    tokens, weights = torch.zeros(1, 12, 32), _mix_ffn_weights(32, 128)
    with pytest.raises(ValueError, match=r"N x \(height \* width\) x C tokens, not shape \(1, 12, 32\) for a 3 x 5 map"):
        native.mix_ffn(tokens, 3, 5, **weights)
    with pytest.raises(ValueError, match=r"fc2's weight of shape \(128, 16\) does not fit 32 channels"):
        native.mix_ffn(tokens, 3, 4, **{**weights, "fc2_weight": torch.zeros(128, 16)})
    with pytest.raises(ValueError, match="multiples of 16 channels, not 24 and 128 hidden"):
        native.mix_ffn(torch.zeros(1, 12, 24), 3, 4, **{**_mix_ffn_weights(24, 128)})
    with pytest.raises(ValueError, match="the tokens must be a contiguous float32 or bfloat16 CPU tensor"):
        native.mix_ffn(tokens.double(), 3, 4, **weights)
    bf16_refusal = "fc1's weight must be a contiguous bfloat16" if native.bf16_pairs() else "AVX-512 BF16"
    with pytest.raises(ValueError, match=bf16_refusal):  # bf16 tokens take their weights as bf16 pairs
        native.mix_ffn(tokens.to(torch.bfloat16), 3, 4, **weights)
    with pytest.raises(ValueError, match=r"the residual of shape \(1, 12, 16\) does not fit"):
        native.mix_ffn(tokens, 3, 4, **weights, residual=torch.zeros(1, 12, 16))
    with pytest.raises(ValueError, match="the norm's weight and bias together"):
        native.mix_ffn(tokens, 3, 4, **weights, norm_weight=torch.ones(32))
    with pytest.raises(ValueError, match=r"the norm's bias of shape \(16,\) does not fit 32 channels"):
        native.mix_ffn(tokens, 3, 4, **weights, norm_weight=torch.ones(32), norm_bias=torch.zeros(16))
    assert native.mix_ffn(torch.zeros(0, 12, 32), 3, 4, **weights).shape == (0, 12, 32)


def _mlp_head_reference(nhwc, first_weight, first_bias, parts, classifier_weight, classifier_bias) -> torch.Tensor:
    """classifier(ReLU(first(x) + the parts upsampled)) in float64, by PyTorch's operators."""
    fused = (nhwc.double() @ first_weight.double() + first_bias.double()).permute(0, 3, 1, 2)
    for part in parts:
        fused = fused + F.interpolate(part.double().permute(0, 3, 1, 2), size=nhwc.shape[1:3], mode="bilinear",
                                      align_corners=False)
    return fused.relu().permute(0, 2, 3, 1) @ classifier_weight.double() + classifier_bias.double()


# MiT-B0's head (32 -> 256 channels, three smaller stages, 21 classes), odd sizes and channel
# counts (classes not whole vectors, more classes than one vector), one pixel and no parts.
@pytest.mark.parametrize("shape", [(1, 16, 16, 32, 256, 21, [(8, 8), (4, 4), (2, 2)]), (2, 9, 13, 24, 32, 5, [(5, 7)]),
                                   (1, 10, 6, 32, 48, 33, [(3, 2), (1, 1)]), (1, 1, 1, 16, 16, 16, [])])
def test_mlp_head_equals_its_operators(shape):
    torch.manual_seed(0)
    n, height, width, in_channels, channels, classes, sizes = shape
    x = torch.randn(n, height, width, in_channels)
    first_weight, first_bias = torch.randn(in_channels, channels) / in_channels ** 0.5, torch.randn(channels)
    parts = [torch.randn(n, h, w, channels) for h, w in sizes]
    classifier_weight, classifier_bias = torch.randn(channels, classes) / channels ** 0.5, torch.randn(classes)
    result = native.mlp_head(x, first_weight, first_bias, parts, classifier_weight, classifier_bias)
    expected = _mlp_head_reference(x, first_weight, first_bias, parts, classifier_weight, classifier_bias)
    assert result.shape == (n, height, width, classes) and result.is_contiguous()
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=2e-6 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_head_gives_the_same_bits_on_one_thread_and_on_two(dtype):
    if dtype == torch.bfloat16 and not native.bf16_pairs():
        pytest.skip("bf16 pair products need AVX-512 BF16")
    torch.manual_seed(0)
    x, parts = torch.randn(3, 11, 7, 32, dtype=dtype), [torch.randn(3, 6, 4, 32, dtype=dtype),
                                                        torch.randn(3, 3, 2, 32, dtype=dtype)]
    weights = (torch.randn(32, 32, dtype=dtype), torch.randn(32), parts, torch.randn(32, 21, dtype=dtype),
               torch.randn(21))
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            results.append(native.mlp_head(x, *weights))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)


def test_mlp_head_refuses_what_it_cannot_compute_with_one_clear_error():
    x, first, bias, classifier, scores = torch.zeros(1, 4, 4, 8), torch.zeros(8, 32), torch.zeros(32), \
        torch.zeros(32, 3), torch.zeros(3)
    with pytest.raises(ValueError, match="do not chain from 8 channels"):
        native.mlp_head(x, first, bias, [], torch.zeros(16, 3), scores)
    with pytest.raises(ValueError, match="a multiple of 16 fused channels, not 24"):
        native.mlp_head(x, torch.zeros(8, 24), torch.zeros(24), [], torch.zeros(24, 3), scores)
    with pytest.raises(ValueError, match="map 0 to upsample must be 1 x h x w x 32"):
        native.mlp_head(x, first, bias, [torch.zeros(1, 2, 2, 16)], classifier, scores)
    with pytest.raises(ValueError, match="at most 8 maps"):
        native.mlp_head(x, first, bias, [torch.zeros(1, 2, 2, 32)] * 9, classifier, scores)
    with pytest.raises(ValueError, match="the map must be a contiguous float32"):
        native.mlp_head(x.double(), first, bias, [], classifier, scores)


def _bf16_head_operators(nhwc, first_weight, first_bias, parts, classifier_weight, classifier_bias) -> torch.Tensor:
    """The head by PyTorch's bf16 operators, as the decoder's operator path rounds: the first share,
    the sum and the scores each to bf16."""
    fused = (nhwc @ first_weight + first_bias).permute(0, 3, 1, 2)
    for part in parts:
        fused = fused + F.interpolate(part.permute(0, 3, 1, 2), size=nhwc.shape[1:3], mode="bilinear",
                                      align_corners=False)
    return fused.relu().permute(0, 2, 3, 1) @ classifier_weight + classifier_bias


@pytest.mark.skipif(not native.bf16_pairs(), reason="bf16 pair products need AVX-512 BF16")
@pytest.mark.parametrize("shape", [(1, 16, 16, 32, 256, 21, [(8, 8), (4, 4), (2, 2)]), (2, 9, 13, 24, 32, 5, [(5, 7)]),
                                   (1, 10, 6, 64, 48, 33, [(3, 2), (1, 1)]), (1, 1, 1, 2, 16, 16, [])])
def test_bf16_mlp_head_errs_no_more_than_pytorchs_bf16_operators(shape):
    """bf16 maps and weights: the scores as close to float64's as PyTorch's bf16 operators come
    (the native pass rounds less: its fused row stays float32 until the classifier)."""
    torch.manual_seed(0)
    n, height, width, in_channels, channels, classes, sizes = shape
    halves = [torch.randn(n, height, width, in_channels), torch.randn(in_channels, channels) / in_channels ** 0.5,
              torch.randn(channels), [torch.randn(n, h, w, channels) for h, w in sizes],
              torch.randn(channels, classes) / channels ** 0.5, torch.randn(classes)]
    halves = [[p.bfloat16() for p in t] if isinstance(t, list) else t.bfloat16() for t in halves]
    expected = _mlp_head_reference(*halves)
    result = native.mlp_head(*halves)
    assert result.dtype == torch.bfloat16 and result.shape == (n, height, width, classes) and result.is_contiguous()
    pytorchs = _bf16_head_operators(*halves)
    def error(scores: torch.Tensor) -> float:
        return (scores.double() - expected).abs().max().item()

    assert error(result) <= error(pytorchs) + 1e-6
    assert error(result) <= 2 ** -7 * expected.abs().max().item()  # one bf16 rounding of the largest score
    halves[2] = halves[2].float()  # float32 biases: the same pass
    assert torch.equal(native.mlp_head(*halves), result)


def test_bf16_mlp_head_refuses_what_it_cannot_compute_with_one_clear_error():
    x, first, bias, classifier, scores = torch.zeros(1, 4, 4, 8).bfloat16(), torch.zeros(8, 32).bfloat16(), \
        torch.zeros(32), torch.zeros(32, 3).bfloat16(), torch.zeros(3)
    with mock.patch.object(native, "bf16_pairs", return_value=False), pytest.raises(ValueError, match="AVX-512 BF16"):
        native.mlp_head(x, first, bias, [], classifier, scores)
    if not native.bf16_pairs():
        return
    with pytest.raises(ValueError, match="the first weight must be a contiguous bfloat16"):
        native.mlp_head(x, first.float(), bias, [], classifier, scores)
    with pytest.raises(ValueError, match="map 0 to upsample must be a contiguous bfloat16"):
        native.mlp_head(x, first, bias, [torch.zeros(1, 2, 2, 32)], classifier, scores)
    with pytest.raises(ValueError, match="an even number of input channels, not 7"):
        native.mlp_head(torch.zeros(1, 4, 4, 7).bfloat16(), first[:7], bias, [], classifier, scores)


@pytest.mark.parametrize("shape", [(2, 37, 32, 32), (1, 5, 160, 160), (3, 1, 7, 48), (1, 130, 64, 16)])
@pytest.mark.parametrize("residual", [False, True])
def test_linear_equals_the_product_over_tokens(shape, residual):
    """Rows not a multiple of the register blocks or of the threads' blocks, inputs not whole vectors."""
    torch.manual_seed(0)
    n, length, in_features, out_features = shape
    tokens, weight_t, bias = torch.randn(n, length, in_features), torch.randn(in_features, out_features), \
        torch.randn(out_features)
    shortcut = torch.randn(n, length, out_features) if residual else None
    result = native.linear(tokens, weight_t, bias, residual=shortcut)
    expected = tokens.double() @ weight_t.double() + bias.double() + (0 if shortcut is None else shortcut.double())
    assert result.shape == (n, length, out_features) and result.is_contiguous()
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=2e-6 * expected.abs().max().item())


def test_linear_refuses_what_it_cannot_compute_with_one_clear_error():
    tokens, weight_t, bias = torch.zeros(2, 5, 32), torch.zeros(32, 16), torch.zeros(16)
    with pytest.raises(ValueError, match=r"linear takes \.\.\. x 32 tokens and a bias of 16"):
        native.linear(torch.zeros(2, 5, 8), weight_t, bias)
    with pytest.raises(ValueError, match="a multiple of 16 outputs, not 24"):
        native.linear(tokens, torch.zeros(32, 24), torch.zeros(24))
    with pytest.raises(ValueError, match=r"the residual of shape \(2, 5, 32\) does not fit"):
        native.linear(tokens, weight_t, bias, residual=torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match="the tokens must be a contiguous float32"):
        native.linear(tokens.transpose(0, 1), weight_t, bias)


def _planar_weights(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout, built here by hand: 3 x 3 x C x P taps, P biases (P whole blocks)."""
    outs = weight.shape[0]
    padded = -(-outs // native.PLANAR_OUTS) * native.PLANAR_OUTS
    taps, biases = torch.randn(3, 3, weight.shape[1], padded), torch.randn(padded)  # the extra ones: anything
    taps[..., :outs] = weight.permute(2, 3, 1, 0)
    biases[:outs] = bias
    return taps, biases


@pytest.mark.parametrize("shape", [(2, 16, 21, 37, 53), (1, 32, 5, 20, 70), (1, 16, 7, 1, 1), (3, 20, 14, 9, 48),
                                   (1, 16, 21, 64, 96)])
@pytest.mark.parametrize("relu", [False, True])
def test_planar_conv3x3_equals_the_convolution(shape, relu):
    """Rows shorter than a vector, not whole register spans (48 pixels) or whole vectors; input
    channels not whole vectors (20: transposed one by one); outputs fewer than, equal to and
    more than a register block."""
    torch.manual_seed(0)
    n, channels, outs, height, width = shape
    x = torch.randn(n, height, width, channels)
    weight, bias = torch.randn(outs, channels, 3, 3), torch.randn(outs)
    result = native.planar_conv3x3(x, *_planar_weights(weight, bias), outs, relu=relu)
    expected = F.conv2d(x.permute(0, 3, 1, 2).double(), weight.double(), bias.double(), padding=1)
    expected = expected.relu() if relu else expected
    assert result.shape == (n, outs, height, width) and result.is_contiguous()
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=2e-6 * expected.abs().max().item())


def test_planar_conv3x3_gives_the_same_bits_on_one_thread_and_on_two():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 13, 50, 16), torch.randn(21, 16, 3, 3), torch.randn(21)
    taps, biases = _planar_weights(weight, bias)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            results.append(native.planar_conv3x3(x, taps, biases, 21))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)


def test_planar_conv3x3_refuses_what_it_cannot_compute_with_one_clear_error():
    x, taps, biases = torch.zeros(1, 4, 4, 16), torch.zeros(3, 3, 16, 7), torch.zeros(7)
    with pytest.raises(ValueError, match=r"takes an N x H x W x C map and 3 x 3 x C x P weights"):
        native.planar_conv3x3(x, torch.zeros(3, 3, 8, 7), biases, 5)
    with pytest.raises(ValueError, match="a multiple of 7 outputs, at least 8"):
        native.planar_conv3x3(x, taps, biases, 8)
    with pytest.raises(ValueError, match="a multiple of 7 outputs"):
        native.planar_conv3x3(x, torch.zeros(3, 3, 16, 8), torch.zeros(8), 5)
    with pytest.raises(ValueError, match="the map must be a contiguous float32"):
        native.planar_conv3x3(x.transpose(1, 2), taps, biases, 5)


def _levels(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """The quantization's definition, in PyTorch's operators (round half to even)."""
    return (torch.round(x * (1.0 / scale)) + zero_point).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("zero_point", [0, 100])
def test_quantize_u8_rounds_half_to_even_and_clamps(zero_point):
    scale = 0.5
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, -100.0, 1000.0, 0.0, 3.3, 1e30, -1e30], dtype=torch.float32)
    x = x.repeat(5)  # the vector loop and the scalar tail alike
    levels = native.quantize_u8(x, scale, zero_point)
    assert torch.equal(levels, _levels(x, scale, zero_point))
    assert levels[:3].tolist() == [zero_point + 0, zero_point + 2, zero_point + 2]  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    assert levels[4] == 0 and levels[5] == 255 and levels[8] == 255 and levels[9] == 0
    assert torch.all(native.quantize_u8(torch.full((37,), float("nan")), 1.0, 7) == 0)


def test_quantize_u8_keeps_a_channels_last_maps_strides_across_blocks_and_threads():
    x = torch.randn(2, 48, 33, 35).contiguous(memory_format=torch.channels_last) * 4  # more than one block
    levels = native.quantize_u8(x, 0.03, 128)
    assert levels.stride() == x.stride() and levels.dtype == torch.uint8
    assert torch.equal(levels, _levels(x, 0.03, 128))


def test_quantize_u8_refuses_what_it_cannot_read_with_one_clear_error():
    with pytest.raises(ValueError, match="float32"):
        native.quantize_u8(torch.zeros(4, dtype=torch.float64), 1.0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        native.quantize_u8(torch.zeros(4, 6)[:, ::2], 1.0, 0)
    with pytest.raises(ValueError, match="zero point"):
        native.quantize_u8(torch.zeros(4), 1.0, 256)


def test_winograd_filters_both_ways_refuse_what_they_cannot_take_with_one_clear_error():
    matrix = torch.randn(16, 9)
    with pytest.raises(ValueError, match="C_out x C_in x 3 x 3 weight"):
        native.winograd_filters(torch.randn(4, 4, 5, 5), matrix)
    with pytest.raises(ValueError, match="R x 9 filter matrix"):
        native.winograd_filters(torch.randn(4, 4, 3, 3), torch.randn(16, 8))
    with pytest.raises(ValueError, match="the weight must be a float32"):
        native.winograd_filters(torch.randn(4, 4, 3, 3).bfloat16(), matrix)
    with pytest.raises(ValueError, match="16 x 4 x 8"):
        native.winograd_filters_backward(torch.randn(16, 8, 4), matrix, torch.empty(8, 4, 3, 3))
    with pytest.raises(ValueError, match="the weight's gradient must be a float32"):
        native.winograd_filters_backward(torch.randn(16, 4, 8), matrix, torch.empty(8, 4, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize("bf16", [False, True])
def test_winograd_filters_both_ways_give_the_same_bits_on_one_thread_and_on_two(bf16):
    torch.manual_seed(0)
    weight = torch.randn(96, 48, 3, 3).contiguous(memory_format=torch.channels_last)
    matrix = torch.randn(16, 9)
    grad = torch.randn(16, 48, 96).to(torch.bfloat16 if bf16 else torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            results.append((native.winograd_filters(weight, matrix, bf16=bf16),
                            native.winograd_filters_backward(grad, matrix, torch.empty_like(weight))))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_interleave_phases_both_ways_refuse_what_they_cannot_take_with_one_clear_error():
    phases = torch.randn(1, 64 * 3, 5, 6).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="even stride"):
        native.interleave_phases(phases, 3)
    with pytest.raises(ValueError, match="N x 64\\*C"):
        native.interleave_phases(torch.randn(1, 60, 5, 6).contiguous(memory_format=torch.channels_last), 8)
    with pytest.raises(ValueError, match="channels-last"):
        native.interleave_phases(torch.randn(1, 64 * 3, 5, 6), 8)
    with pytest.raises(ValueError, match="N x C x 8H x 8W"):
        native.interleave_phases_backward(torch.randn(1, 3, 12, 16).contiguous(memory_format=torch.channels_last), 8)
    with pytest.raises(ValueError, match="channels-last"):
        native.interleave_phases_backward(torch.randn(1, 3, 16, 16), 8)
    with pytest.raises(ValueError, match="even stride"):
        native.interleave_phases_backward(torch.randn(1, 3, 18, 18).contiguous(memory_format=torch.channels_last), 3)
