"""The generated straight-line transforms (seglab.ops.native.specialise): their structure here,
their values through the compiled kernels (test_ops_native.py and, for matrices of any shape of
pairs, a fresh build below)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from seglab.ops import native
from seglab.ops.native.specialise import kernels, linear_map
from seglab.ops.winograd import _native_matrices


def _operations(code: str) -> int:
    """Vector additions and multiplications, not counting the index arithmetic in brackets."""
    arithmetic = re.sub(r"\[[^\]]*\]", "", code)
    return sum(arithmetic.count(operator) for operator in (" + ", " - ", " * "))


@pytest.mark.parametrize("tile", [4, 6])
def test_winograds_matrices_take_fewer_operations_than_their_entries(tile):
    for matrix in _native_matrices(tile):
        code = linear_map("f", matrix.tolist())
        # each row as its own sum: k nonzero terms take k - 1 additions and their non-unit products
        unshared = sum(int((row != 0).sum()) - 1 + int(((row != 0) & (row.abs() != 1)).sum()) for row in matrix)
        assert _operations(code) < 0.8 * unshared, code


def test_mirrored_rows_share_their_even_and_odd_parts():
    code = linear_map("f", [[1, 2, 3], [1, -2, 3], [0, 0, 5]])
    assert "const vec8 e0 = x0 + 3.0f * x2, o0 = 2.0f * x1;" in code
    assert "y[0 * ys] = e0 + o0;" in code and "y[1 * ys] = e0 - o0;" in code
    assert "y[2 * ys] = 5.0f * x2;" in code


def test_mirrored_columns_enter_as_a_sum_or_a_difference():
    code = linear_map("f", [[1, 1, 2], [4, -4, 0]])
    assert "const vec8 s0 = x0 + x1, t0 = x0 - x1;" in code
    assert "y[0 * ys] = s0 + 2.0f * x2;" in code and "y[1 * ys] = 4.0f * t0;" in code


def test_a_row_of_zeros_writes_zeros():
    assert "y[1 * ys] = (vec16){0};" in linear_map("f", [[1, 0], [0, 0]], "vec16")


def test_a_column_of_zeros_is_not_loaded():  # (a scatter map's unread tile row: an unused variable)
    code = linear_map("f", [[1, 0, 2], [3, 0, -1]])
    assert "x1 = x[1 * xs]" not in code and "x0 = x[0 * xs]" in code and "x2 = x[2 * xs]" in code


def test_each_matrix_is_found_by_its_bits():
    code = kernels([[[1.0, 0.5], [0.25, -1.0]]], [])
    assert "static const float matrix_gather_known_0[4] = {0x1.0000000000000p+0f, 0x1.0000000000000p-1f," in code
    assert ("memcmp(matrix, matrix_gather_known_0, sizeof matrix_gather_known_0) == 0) return KERNEL(gather_known_0);"
            in code)  # the float32 or the bf16 kernel, by the caller's `bf16`
    assert "DEFINE_GATHERS(gather_known_0, 2, 2, 2, TRANSFORM_gather_known_0)" in code
    assert "static RangeFn specialised_scatter(int out_side, int in_side, const float *matrix, int bf16) {" in code


BUILD = """
import torch
from seglab.ops import native
torch.manual_seed(0)
matrices = [torch.tensor(m) for m in ({matrices})]
native.specialise(gathers=matrices, scatters=[m.t().contiguous() for m in matrices])
x = torch.randn(2, 11, 9, 13)
for m in matrices:
    assert native.compiled_in(m) and native.compiled_in(m.t().contiguous(), "scatter")
    for kind in ("gather", "scatter"):
        matrix = m if kind == "gather" else m.t().contiguous()
        if kind == "gather":
            runs = [native.gather_tiles(x, matrix, step=4, pad=1, specialised=s) for s in (True, False)]
        else:
            tiles = torch.randn(matrix.shape[1] ** 2, 2 * 3 * 3, 13)
            runs = [native.scatter_tiles(tiles, matrix, (2, 11, 9), step=4, pad=1, accumulate_into=torch.zeros(x.shape),
                                         specialised=s) for s in (True, False)]
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-5 * runs[1].abs().max().item())
print("ok")
"""


@pytest.mark.skipif(not native.available(), reason=f"no native kernels: {native.unavailable_reason()}")
def test_a_fresh_build_computes_what_the_general_kernel_does_for_any_pattern(tmp_path):
    matrices = ("[[1., 2., 0., -3., 1., 0.], [1., -2., 0., 3., 1., 0.], [0., 0., 0., 0., 0., 0.],"  # row pair, zeros
                " [0.5, 0.25, 1., 1., 1., 1.], [7., 0., 0., 0., 0., 1.], [1., 1., 1., 1., 1., 1.]]",
                "[[1., 1., 2., 2., 0., 1.], [3., -3., 2., -2., 1., 0.], [0., 0., 1., 1., 1., 1.],"  # column pairs
                " [1., -1., 0., 0., 2., 2.], [5., 5., -1., 1., 0., 0.], [1., 1., 1., 1., 1., 1.]]",
                "[[1., 0., -2., 0.], [1., 0., 2., 0.], [0., 3., 0., 1.], [0.5, 1., 1., -1.]]")  # 4 x 4: WIDE lanes
    env = {**os.environ, "SEGLAB_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", BUILD.format(matrices=", ".join(matrices) + ",")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_matrices_wider_than_the_kernels_are_refused():
    with pytest.raises(ValueError, match="sides 1 to 8, not \\(9, 9\\)"):
        native.specialise(gathers=(torch.ones(9, 9),))
