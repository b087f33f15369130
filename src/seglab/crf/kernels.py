"""The CRF's pairwise kernels as sparse linear maps over permutohedral lattices.

Krähenbühl & Koltun (NeurIPS 2011), section 4: the appearance kernel is a Gaussian over
(position / theta_alpha, colour / theta_beta), the smoothness kernel a Gaussian over
position / theta_gamma; a mean-field step applies each to all K label maps at once. Each
kernel is symmetrically normalised, D^-1/2 K D^-1/2 with D its row sums, as in the reference
implementation's default (NORMALIZE_SYMMETRIC).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from seglab.crf.lattice import PermutohedralLattice
from seglab.ops.grad_mode import records_gradients

__all__ = ["KernelSum", "NormalisedKernel", "PairwiseKernels"]


@dataclass(frozen=True)
class PairwiseKernels:
    """The two kernels' widths (pixels; 8-bit colour units for theta_beta)."""

    theta_alpha: float
    theta_beta: float
    theta_gamma: float

    def build(self, image: torch.Tensor) -> tuple[NormalisedKernel, NormalisedKernel]:
        """(appearance, smoothness) kernels over the pixels of N x 3 x H x W `image` (0..255).

        The smoothness kernel depends only on the image size, so it is cached: a stream of
        same-sized images (a validation set, a video) builds it once."""
        n, _, h, w = image.shape
        position = _pixel_positions(n, h, w, image.device)
        colour = image.float().permute(0, 2, 3, 1).reshape(-1, 3)
        appearance = torch.cat([position / self.theta_alpha, colour / self.theta_beta], dim=1)
        return (
            NormalisedKernel(PermutohedralLattice(appearance, _batch_index(n, h, w, image.device))),
            _smoothness_kernel(n, h, w, self.theta_gamma, image.device),
        )


class NormalisedKernel:
    """D^-1/2 K D^-1/2 for a lattice Gaussian K with row sums D, applied to P x C values.

    The normalisation is folded into the sparse splat and slice matrices, so applying it is
    one splat, d+1 blurs and one slice. Differentiable in the values, with an explicit
    adjoint: splat and slice swap roles and the blurs run in reverse (each is symmetric).
    """

    def __init__(self, lattice: PermutohedralLattice) -> None:
        self.lattice = lattice
        self.num_points = lattice.num_points
        self.blurs = lattice.blur_matrices()
        scale = lattice.row_sums(self.blurs).add_(1e-20).rsqrt_()
        self.into_lattice = lattice.weights * scale
        self.out_of_lattice = lattice.alpha * lattice.weights * scale
        self.splat = lattice.splat_matrix(self.into_lattice)
        self.slice = lattice.slice_matrix(self.out_of_lattice)
        self._adjoint: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, values: torch.Tensor, add_to: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
        """add_to + weight x kernel(values) (add_to defaults to zero)."""
        if values.dim() != 2 or values.shape[0] != self.num_points:
            raise ValueError(f"values must be {self.num_points} x C, got shape {tuple(values.shape)}")
        if records_gradients(values, add_to):
            filtered = weight * _ApplyKernel.apply(values, self)
            return filtered if add_to is None else add_to + filtered
        vertices = self._splat_and_blur(values.float(), self.splat)
        if add_to is None:
            return weight * (self.slice @ vertices)
        return torch.addmm(add_to, self.slice, vertices, alpha=weight)

    def adjoint(self, values: torch.Tensor) -> torch.Tensor:
        """The transpose of the kernel applied to `values` (for back-propagation)."""
        if self._adjoint is None:
            self._adjoint = (self.lattice.splat_matrix(self.out_of_lattice), self.lattice.slice_matrix(self.into_lattice))
        splat, slice_ = self._adjoint
        return slice_ @ self._splat_and_blur(values.float(), splat, reverse=True)

    def _splat_and_blur(self, values: torch.Tensor, splat: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        vertices = self.lattice.fold(splat @ values)
        for blur in reversed(self.blurs) if reverse else self.blurs:
            vertices = blur @ vertices
        return vertices


class KernelSum:
    """sum_m w_m kernel_m, applied with one splat and one slice for all the kernels.

    The kernels' splat matrices are stacked (rows), their slice matrices joined (columns), so
    a mean-field step reads Q once and writes the messages once, however many kernels there
    are; each kernel still blurs its own block of vertices. Inference only (no autograd):
    differentiable callers apply the kernels one by one.
    """

    def __init__(self, kernels: list[NormalisedKernel], weights: list[float]) -> None:
        splat_rows = [kernel.splat.shape[0] for kernel in kernels]  # blocks x vertices, see PermutohedralLattice.fold
        sizes = [kernel.lattice.num_vertices for kernel in kernels]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        splat_starts = [sum(splat_rows[:i]) for i in range(len(splat_rows))]
        num_points = kernels[0].num_points
        splat_crow = torch.cat(
            [kernels[0].splat.crow_indices()[:1]] + [k.splat.crow_indices()[1:] + k_start for k, k_start in zip(kernels, _cumulative_nnz(kernels))]
        )
        self.splat = _csr(
            splat_crow,
            torch.cat([k.splat.col_indices() for k in kernels]),
            torch.cat([k.splat.values() for k in kernels]),
            (sum(splat_rows), num_points),
        )
        per_point = [k.slice.values().numel() // num_points for k in kernels]
        cols = torch.cat([(k.slice.col_indices() + start).view(num_points, n) for k, start, n in zip(kernels, starts, per_point)], dim=1)
        values = torch.cat([(w * k.slice.values()).view(num_points, n) for k, w, n in zip(kernels, weights, per_point)], dim=1)
        crow = torch.arange(0, cols.numel() + 1, cols.shape[1], dtype=cols.dtype, device=cols.device)
        self.slice = _csr(crow, cols.reshape(-1), values.reshape(-1), (num_points, sum(sizes)))
        self.blocks = [
            (start, start + rows, vertex_start, kernel) for start, rows, vertex_start, kernel in zip(splat_starts, splat_rows, starts, kernels)
        ]
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, values: torch.Tensor, add_to: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """add_to + sum_m w_m kernel_m(values), for P x C `values` (written into `out` if given).

        The vertex values go through buffers kept from call to call: `sparse @ dense` would zero
        a fresh result and copy it (a third of a blur's time), and fresh large tensors cost
        page faults; `addmm(beta=0, out=...)` writes the product straight into the buffer."""
        channels = values.shape[1]
        vertices = _product(self.splat, values.float(), self._buffer("splat", self.splat.shape[0], channels, values))
        blurred = self._buffer("blurred", self.slice.shape[1], channels, values)
        for start, end, vertex_start, kernel in self.blocks:
            block = kernel.lattice.fold(vertices[start:end])
            ping_pong = [self._buffer(name, block.shape[0], channels, values) for name in (f"{start}a", f"{start}b")]
            for step, blur in enumerate(kernel.blurs):
                last = step == len(kernel.blurs) - 1
                target = blurred[vertex_start : vertex_start + block.shape[0]] if last else ping_pong[step % 2]
                block = _product(blur, block, target)
        return torch.addmm(add_to, self.slice, blurred, out=out)

    def _buffer(self, name: str, rows: int, channels: int, like: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != (rows, channels) or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(rows, channels, dtype=torch.float32, device=like.device)
        return buffer


def _product(matrix: torch.Tensor, dense: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """matrix @ dense written into `out` (beta = 0: whatever `out` held is ignored, NaN included)."""
    return torch.addmm(out, matrix, dense, beta=0, out=out)


def _cumulative_nnz(kernels: list[NormalisedKernel]) -> list[int]:
    counts = [int(kernel.splat.values().numel()) for kernel in kernels]
    return [sum(counts[:i]) for i in range(len(counts))]


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)


class _ApplyKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, kernel: NormalisedKernel) -> torch.Tensor:
        ctx.kernel = kernel
        return kernel.slice @ kernel._splat_and_blur(values.float(), kernel.splat)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return ctx.kernel.adjoint(grad_output), None


def _pixel_positions(n: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32), torch.arange(w, device=device, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([xs, ys], dim=-1).reshape(1, h * w, 2).expand(n, -1, -1).reshape(-1, 2)


def _batch_index(n: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device).repeat_interleave(h * w)


@lru_cache(maxsize=2)
def _smoothness_kernel(n: int, h: int, w: int, theta_gamma: float, device: torch.device) -> NormalisedKernel:
    lattice = PermutohedralLattice(_pixel_positions(n, h, w, device) / theta_gamma, _batch_index(n, h, w, device))
    return NormalisedKernel(lattice)
