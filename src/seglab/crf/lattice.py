"""The permutohedral lattice: fast high-dimensional Gaussian filtering in linear time.

Adams, Baek & Davis, "Fast High-Dimensional Filtering Using the Permutohedral Lattice",
Eurographics 2010. Each point with a d-dimensional feature vector is embedded in the
hyperplane sum(x) = 0 of R^(d+1), which the lattice (d+1)A*_d tiles with simplices; the
filter is three linear maps:

    splat  -- every point spreads its value onto the d+1 vertices of its simplex,
              with barycentric weights;
    blur   -- each vertex is blurred with its two neighbours, [1/2, 1, 1/2], along each of
              the d+1 lattice directions in turn;
    slice  -- every point reads back the barycentric mix of its simplex's vertices.

Only vertices that some point touches exist, so cost and memory grow with the number of
points, not with the volume of feature space. Here the lattice is built once per set of
features, fully vectorised (no loop over points): the per-point work is a sorting network
over d+1 rows and the barycentric weights are the gaps between the sorted offsets, points
sharing a simplex are grouped by a sort of P packed int64 keys, the vertices deduplicated by
a sort of the distinct simplexes' keys, and blur neighbours found by binary search. Splat,
blur and slice are sparse CSR matrices, so filtering C channels (all K labels of a CRF) is a
handful of sparse-dense products, differentiable by autograd.

The constants (the elevation scale, the 1/(1 + 2^-d) slice factor) follow Krähenbühl &
Koltun's implementation, so a feature difference of 1 is about one standard deviation of the
Gaussian: pass features already divided by the kernel widths.
"""
from __future__ import annotations

import math
import warnings

import torch

__all__ = ["PermutohedralLattice"]


class PermutohedralLattice:
    """A lattice over `features` (P x d); `filter(values)` Gaussian-filters P x C values.

    `filter` returns, for every point i, approximately sum_j exp(-|f_i - f_j|^2 / 2) v_j,
    the point itself included (the lattice is an approximation: the response of a point to
    itself is below 1 and the kernel a little wider than the exact Gaussian).

    `batch_index` (P, integer) keeps points of different images on separate lattices, so one
    lattice serves a whole batch and points only ever interact within their own image.
    """

    def __init__(self, features: torch.Tensor, batch_index: torch.Tensor | None = None) -> None:
        if features.dim() != 2 or features.shape[0] < 1 or not 1 <= features.shape[1] <= 14:
            raise ValueError(f"lattice features must be P x d with P >= 1 and 1 <= d <= 14, got shape {tuple(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("lattice features must be finite")
        if batch_index is not None and batch_index.shape != features.shape[:1]:
            raise ValueError(f"batch_index must have one entry per point ({features.shape[0]}), got {tuple(batch_index.shape)}")
        with torch.no_grad():
            self._build(features.detach().float(), batch_index)

    @property
    def alpha(self) -> float:
        """Adams et al.'s correction of the blur's total mass, applied when slicing."""
        return 1.0 / (1.0 + 2.0 ** (-self.dim))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Gaussian-filter `values` (P x C); differentiable in `values` (plain autograd)."""
        if values.dim() != 2 or values.shape[0] != self.num_points:
            raise ValueError(
                f"values to filter must be {self.num_points} x C (one row per lattice point), got shape {tuple(values.shape)}"
            )
        vertices = self.fold(self.splat_matrix(self.weights) @ values.float())
        for step in self.blur_matrices():
            vertices = step @ vertices
        return self.slice_matrix(self.alpha * self.weights) @ vertices

    def row_sums(self, blurs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """filter(ones), P x 1: the kernel's row sums, cheaply (splatting ones is a bincount)."""
        vertices = torch.bincount(self.vertices.reshape(-1), self.weights.reshape(-1), minlength=self.num_vertices)
        vertices = vertices.float()[:, None]
        for blur in self.blur_matrices() if blurs is None else blurs:
            vertices = blur @ vertices
        return self.alpha * (self.weights * torch.take(vertices, self.vertices)).sum(dim=1, keepdim=True)  # take: 2x faster than [] here

    def splat_matrix(self, point_weights: torch.Tensor) -> torch.Tensor:
        """(point_blocks x M) x P sparse matrix: each vertex gathers its points' values times
        `point_weights` (P x (d+1), one weight per point and vertex of its simplex, as in
        `vertices`), one row per vertex and block of points; `fold` sums the blocks."""
        values = torch.index_select(point_weights.reshape(-1), 0, self._splat_pairs)  # 2x faster than []
        return _csr_from_crow(self._splat_crow, self._splat_cols, values, (self.point_blocks * self.num_vertices, self.num_points))

    def fold(self, splatted: torch.Tensor) -> torch.Tensor:
        """(point_blocks x M) x C, a splat matrix's product -> M x C vertex values."""
        if self.point_blocks == 1:
            return splatted
        return splatted.view(self.point_blocks, self.num_vertices, -1).sum(dim=0)

    def slice_matrix(self, point_weights: torch.Tensor) -> torch.Tensor:
        """P x M sparse matrix: each point reads its simplex's vertices times `point_weights`."""
        crow = torch.arange(0, self.num_points * (self.dim + 1) + 1, self.dim + 1, device=self.vertices.device)
        return _csr_from_crow(crow, self.vertices.reshape(-1), point_weights.reshape(-1), (self.num_points, self.num_vertices))

    def blur_matrices(self) -> list[torch.Tensor]:
        """d+1 sparse M x M matrices, the [1/2, 1, 1/2] blur along each lattice direction."""
        return [_csr_from_triplets(*triplet, (self.num_vertices, self.num_vertices)) for triplet in self.blur_triplets]

    def _build(self, features: torch.Tensor, batch_index: torch.Tensor | None) -> None:
        num_points, d = features.shape
        device = features.device
        self.num_points, self.dim = num_points, d

        # Elevate onto the hyperplane sum(x) = 0 (the matrix E of Adams et al., p. 5), scaled so
        # that the blur below has standard deviation about 1 in feature units. Coordinates are
        # kept as rows, (d+1) x P: every step below is then a few whole-row operations.
        elevated = _elevation_matrix(d, device) @ features.T

        # The nearest remainder-0 point, (d+1) k, and the offset from it, sorted descending per
        # point by an odd-even transposition network over the rows (stable: ties keep the
        # earlier coordinate first, as the reference's ranking does). `coordinate[a]` is the
        # coordinate at sorted position a; a permutation index swap is an xor, since
        # torch.where is several times slower than arithmetic on these small types.
        k = _round_half_away(elevated / (d + 1))
        offset = elevated.sub_(k, alpha=d + 1)
        coordinate = torch.arange(d + 1, dtype=torch.uint8, device=device)[:, None].repeat(1, num_points)
        for round_ in range(d + 1):
            first = round_ % 2
            last = first + 2 * ((d + 1 - first) // 2)
            upper, lower = offset[first:last:2], offset[first + 1 : last + 1 : 2]
            if upper.shape[0] == 0:
                continue
            swap = lower > upper
            smaller = torch.minimum(upper, lower)
            torch.maximum(upper, lower, out=upper)
            lower.copy_(smaller)
            flip = (coordinate[first:last:2] ^ coordinate[first + 1 : last + 1 : 2]).mul_(swap)
            coordinate[first:last:2] ^= flip
            coordinate[first + 1 : last + 1 : 2] ^= flip

        # Barycentric weights (p. 10) are the gaps between consecutive sorted offsets, plus the
        # gap that wraps around, 1 - (largest - smallest) / (d+1). Adams et al. first move points
        # whose k does not sum to zero back onto the plane (ranks shifted by s = sum k, cyclically)
        # and then read the weights in vertex order; that only rotates the same d+1 gaps, so the
        # weights are kept in gap order here and the rotation is applied once per simplex below.
        gaps = torch.empty_like(offset)
        torch.sub(offset[:-1], offset[1:], out=gaps[:-1])
        torch.sub(offset[-1], offset[0], out=gaps[-1]).add_(d + 1)
        self.weights = gaps.div_(d + 1).T.contiguous()

        # Points with the same k and the same sorting permutation lie in the same simplex: sort
        # them next to each other. (Points of one simplex can arrive with different k, when
        # some rounded off the plane; they form separate groups whose vertices coincide, and
        # the deduplication of vertices below merges them.)
        if batch_index is None:
            batch_index = torch.zeros(num_points, dtype=torch.long, device=device)
        k = k.long()
        point_order, starts_simplex = _group_by_simplex(
            batch_index.to(device=device, dtype=torch.long), torch.cat([k[:d], k.sum(dim=0, keepdim=True)]), coordinate
        )
        simplex_in_order = starts_simplex.cumsum(0) - 1
        representative = point_order[starts_simplex]
        num_simplexes = int(representative.shape[0])

        # Per simplex: the ranks of the coordinates and the remainder-0 corner on the plane
        # (rank += s; ranks that leave 0..d wrap, moving their coordinate by d+1).
        k_of = torch.index_select(k, 1, representative).T  # index_select: several times faster than [] here
        position_of = torch.index_select(coordinate, 1, representative).T.long()  # [simplex, a] = coordinate at position a
        s = k_of.sum(dim=1, keepdim=True)
        shifted = torch.arange(d + 1, device=device) + s
        wrap = torch.div(shifted, d + 1, rounding_mode="floor")  # -1, 0 or 1
        rank = torch.empty_like(position_of).scatter_(1, position_of, shifted - (d + 1) * wrap)
        remainder0 = (d + 1) * (k_of - torch.empty_like(position_of).scatter_(1, position_of, wrap))

        # Their vertices as packed keys: vertex r is corner + r, less d+1 on each coordinate
        # whose rank exceeds d - r (the last coordinate is implied by sum = 0; the image index
        # is the top digit, so images never share a vertex). Gap a is the weight of vertex
        # (d - a - s) mod (d+1). Deduplicate with one more sort.
        corner, strides = _pack(batch_index[representative].to(device=device, dtype=torch.long), remainder0[:, :d], margin=2 * (d + 1))
        jumps = torch.zeros(num_simplexes, d + 2, dtype=torch.long, device=device)
        jumps.scatter_add_(1, d + 1 - rank[:, :d], strides.expand(num_simplexes, d))
        remainders = torch.arange(d + 1, device=device)
        vertex_codes_in_r = corner[:, None] + remainders * strides.sum() - (d + 1) * jumps.cumsum(dim=1)[:, : d + 1]
        slot_codes = vertex_codes_in_r.gather(1, torch.remainder(d - remainders - s, d + 1))
        sorted_codes, slot_order = torch.sort(slot_codes.reshape(-1))
        starts_vertex = _run_starts(sorted_codes)
        vertex_in_order = starts_vertex.cumsum(0) - 1
        vertex_codes = sorted_codes[starts_vertex]
        self.num_vertices = int(vertex_codes.shape[0])
        slot_vertex = torch.empty_like(vertex_in_order).scatter_(0, slot_order, vertex_in_order).reshape(num_simplexes, d + 1)
        simplex_of_point = torch.empty_like(simplex_in_order).scatter_(0, point_order, simplex_in_order)
        self.vertices = torch.index_select(slot_vertex, 0, simplex_of_point)

        # The splat matrix lists, for each vertex, the (point, vertex-of-simplex) pairs that
        # land on it: a stable sort of the pairs' vertex ids, in the narrowest integer type
        # that holds them (sorting 16-bit keys is several times faster than 64-bit ones). With
        # many points and few vertices it is cut into blocks of points, one row per vertex and
        # block: the product then reads the values block by block, which stay in cache while
        # their vertices gather them (1.8x faster at 1280 x 960 for the CRF's appearance
        # kernel), for a small sum of the blocks' vertex rows afterwards.
        block = _points_per_splat_block(num_points, self.num_vertices)
        self.point_blocks = -(-num_points // block)
        vertex_of_pair = self.vertices.reshape(-1)
        narrow = torch.int16 if self.num_vertices < 2**15 else torch.int32 if self.num_vertices < 2**31 else torch.int64
        pair_blocks = vertex_of_pair.to(narrow).split(block * (d + 1))
        self._splat_pairs = torch.cat(
            [torch.argsort(pairs, stable=True).add_(b * block * (d + 1)) for b, pairs in enumerate(pair_blocks)]
        )
        point_of_pair = torch.arange(num_points, dtype=torch.int32 if num_points < 2**31 else torch.long, device=device)
        point_of_pair = point_of_pair[:, None].expand(num_points, d + 1).reshape(-1)
        self._splat_cols = torch.index_select(point_of_pair, 0, self._splat_pairs)  # pair // (d+1), without a division
        pairs_per_row = torch.cat([torch.bincount(pairs, minlength=self.num_vertices) for pairs in pair_blocks])
        self._splat_crow = torch.cat([pairs_per_row.new_zeros(1), pairs_per_row.cumsum(0)])

        # Blur neighbours: a step along lattice direction j adds 1 to every coordinate and
        # subtracts d+1 from coordinate j (direction d moves only the implied one), which is a
        # fixed offset of the packed key; the margin in the packing keeps it collision free.
        offsets = (strides.sum() - (d + 1) * torch.cat([strides, strides.new_zeros(1)])).abs()
        queries = torch.cat([vertex_codes[None, :] - offsets[:, None], vertex_codes[None, :] + offsets[:, None]])
        position = torch.searchsorted(vertex_codes, queries).clamp_(max=self.num_vertices - 1)
        neighbour = torch.where(vertex_codes[position] == queries, position, -1)
        self.blur_triplets = [_blur_triplet(neighbour[j], neighbour[j + d + 1]) for j in range(d + 1)]


def _blur_triplet(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of I + (lower + upper) / 2, sorted; absent neighbours (-1) dropped,
    as if they held zero (no point touched them)."""
    own = torch.arange(lower.shape[0], device=lower.device)
    cols = torch.stack([lower, own, upper], dim=1)  # lower < own < upper: packing preserves order
    values = torch.tensor([0.5, 1.0, 0.5], device=own.device).expand_as(cols)
    present = cols >= 0
    return own.repeat_interleave(present.sum(dim=1)), cols[present], values[present]


# Points per block of the splat matrix, when blocks pay (see `_points_per_splat_block`):
# 64K rows of 21 labels are 5.5 MB, within a small L3 cache.
SPLAT_BLOCK = 65536


def _points_per_splat_block(num_points: int, num_vertices: int) -> int:
    """Block the splat when there are several blocks and the blocks' vertex rows (to be
    summed) stay below a quarter of the points: the CRF's appearance lattice on large images,
    not its smoothness lattice, whose vertices grow with the pixels."""
    blocks = -(-num_points // SPLAT_BLOCK)
    return SPLAT_BLOCK if blocks > 1 and blocks * num_vertices <= num_points // 4 else num_points


# Below this many distinct (image, k, permutation) keys, one int64 sort groups the points.
SINGLE_KEY_LIMIT = 2**62


def _group_by_simplex(batch_index: torch.Tensor, digits: torch.Tensor, coordinate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ordered so that equal (image, digits, permutation) are adjacent, and a mask of
    where each run starts (in that order). `digits` are rows (k_1..k_d and s), `coordinate`
    the (d+1) x P sorting permutation."""
    corner, _ = _pack(batch_index, digits.T, margin=0)
    n = coordinate.shape[0]
    permutation = coordinate[0].long()
    for row in coordinate[1:]:
        permutation = (permutation * n).add_(row)  # < n^n <= 15^15 < 2^59
    if (int(corner.max()) + 1) * n**n < SINGLE_KEY_LIMIT:
        key = (corner * n**n).add_(permutation)
        point_order = torch.argsort(key)
        return point_order, _run_starts(key[point_order])
    # Too wide for one key: a lexicographic order from two stable sorts.
    by_permutation = torch.argsort(permutation, stable=True)
    point_order = by_permutation[torch.argsort(corner[by_permutation], stable=True)]
    return point_order, _run_starts(corner[point_order]) | _run_starts(permutation[point_order])


def _run_starts(sorted_values: torch.Tensor) -> torch.Tensor:
    """True where a run of equal values begins in a sorted 1-D tensor (always at index 0)."""
    starts = torch.ones_like(sorted_values, dtype=torch.bool)
    starts[1:] = sorted_values[1:] != sorted_values[:-1]
    return starts


def _pack(batch_index: torch.Tensor, coordinates: torch.Tensor, margin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed-radix int64 packing of (image, k_1..k_d) over the observed ranges widened by
    `margin`, so nearby keys pack without collision: (packed keys, strides of k_1..k_d)."""
    low = coordinates.min(dim=0).values - margin
    sizes = (coordinates.max(dim=0).values + margin - low + 1).tolist()
    num_images = int(batch_index.max()) - int(batch_index.min()) + 1
    if math.prod(sizes) * num_images >= 2**62:
        raise ValueError(
            "permutohedral lattice keys do not fit in 64 bits for these features; use larger kernel widths (theta)"
        )
    strides = [1]
    for size in reversed(sizes[1:]):
        strides.insert(0, strides[0] * size)
    strides = torch.tensor(strides, dtype=torch.long, device=coordinates.device)
    packed = ((coordinates - low) * strides).sum(dim=1) + (batch_index - batch_index.min()) * (strides[0] * sizes[0])
    return packed, strides


def _elevation_matrix(d: int, device: torch.device) -> torch.Tensor:
    """(d+1) x d: row k maps a feature vector to elevated coordinate k, sum_{j >= k} s_j - k s_{k-1},
    with s_j = f_j sqrt(2/3) (d+1) / sqrt((j+1)(j+2)) (Adams et al.'s E with the blur's scale)."""
    dims = torch.arange(1, d + 1, dtype=torch.float64)
    scale = math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt(dims * (dims + 1))
    matrix = torch.ones(d + 1, d, dtype=torch.float64).triu()  # [k, j] = 1 for j >= k
    matrix[torch.arange(1, d + 1), torch.arange(d)] -= dims
    return (matrix * scale).float().to(device)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's round(): halves go away from zero (torch.round goes to even), as the reference does."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _csr_from_crow(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if int(crow[-1]) < 2**31 and max(size) < 2**31:  # 32-bit indices spare a conversion per product
        crow, cols = crow.int(), cols.int()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols, values.float(), size, check_invariants=False)


def _csr_from_triplets(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from triplets whose `rows` are already sorted (not checked)."""
    counts = torch.bincount(rows, minlength=size[0])
    return _csr_from_crow(torch.cat([counts.new_zeros(1), counts.cumsum(0)]), cols, values, size)
