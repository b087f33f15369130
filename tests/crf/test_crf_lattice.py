"""The permutohedral lattice against the Gaussian it approximates (Adams et al. 2010)."""
import math

import pytest
import torch

from seglab.crf.kernels import NormalisedKernel
from seglab.crf import lattice as lattice_module
from seglab.crf.lattice import PermutohedralLattice


def grid_positions(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2)


def test_constant_in_constant_out():
    torch.manual_seed(0)
    features = torch.cat([grid_positions(30, 40) / 5.0, torch.rand(1200, 3) * 4], dim=1)
    lattice = PermutohedralLattice(features)
    constant = torch.full((1200, 2), 3.5)
    normalised = lattice.filter(constant) / lattice.filter(torch.ones(1200, 1))
    torch.testing.assert_close(normalised, constant, rtol=1e-5, atol=1e-5)
    # Away from the borders, the raw (unnormalised) response to a constant is flat too.
    raw = lattice.filter(torch.ones(1200, 1)).reshape(30, 40)
    plain = PermutohedralLattice(grid_positions(30, 40) / 5.0).filter(torch.ones(1200, 1)).reshape(30, 40)
    interior = plain[12:18, 12:28]
    assert float(interior.std() / interior.mean()) < 0.02
    assert bool((raw > 0).all())


@pytest.mark.parametrize("theta", [2.0, 4.0])
def test_delta_spreads_like_a_gaussian(theta):
    h = w = 41
    lattice = PermutohedralLattice(grid_positions(h, w) / theta)
    delta = torch.zeros(h * w, 1)
    delta[20 * w + 20] = 1.0
    response = lattice.filter(delta).reshape(h, w)
    offsets = torch.arange(w, dtype=torch.float32) - 20
    # Centred on the delta (the lattice is not exactly shift invariant: the peak may sit a pixel off).
    peak_row, peak_col = divmod(int(response.argmax()), w)
    assert abs(peak_row - 20) <= 1 and abs(peak_col - 20) <= 1
    for centroid in ((response.sum(0) * offsets).sum() / response.sum(), (response.sum(1) * offsets).sum() / response.sum()):
        assert abs(float(centroid)) < 0.25
    for profile in (response[20], response[:, 20]):
        sigma = math.sqrt(float((profile * offsets**2).sum() / profile.sum()))
        assert sigma == pytest.approx(theta, rel=0.1)
        right = profile[21:]
        assert bool((right[1:] <= right[:-1] + 1e-7).all())  # falls off with distance
    # The shape as a whole: the exact Gaussian with the same mass, within 15% (L2).
    ys, xs = torch.meshgrid(offsets, offsets, indexing="ij")
    gaussian = torch.exp(-(xs**2 + ys**2) / (2 * theta**2))
    gaussian, response = gaussian / gaussian.sum(), response / response.sum()
    assert float((response - gaussian).norm() / gaussian.norm()) < 0.15


def test_matches_brute_force_gaussian_on_a_tiny_image():
    torch.manual_seed(1)
    h, w = 12, 14
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 3, 4), size=(h, w), mode="bilinear", align_corners=False)
    colour = smooth[0].permute(1, 2, 0).reshape(-1, 3) * 255
    features = torch.cat([grid_positions(h, w) / 4.0, colour / 40.0], dim=1)
    values = torch.rand(h * w, 3)
    lattice = PermutohedralLattice(features)

    squared = ((features[:, None, :] - features[None, :, :]) ** 2).sum(dim=-1)
    exact = torch.exp(-squared / 2)
    expected = exact @ values / exact.sum(dim=1, keepdim=True)
    approx = lattice.filter(values) / lattice.filter(torch.ones(h * w, 1))
    relative_error = float((approx - expected).norm() / expected.norm())
    assert relative_error < 0.05
    centred = lambda t: (t - t.mean(dim=0)).reshape(-1)
    assert float(torch.nn.functional.cosine_similarity(centred(approx), centred(expected), dim=0)) > 0.9


def test_batch_index_keeps_images_apart():
    torch.manual_seed(2)
    a, b = torch.rand(50, 3) * 3, torch.rand(60, 3) * 3
    values = torch.rand(110, 2)
    together = PermutohedralLattice(torch.cat([a, b]), torch.cat([torch.zeros(50), torch.ones(60)]).long()).filter(values)
    torch.testing.assert_close(together[:50], PermutohedralLattice(a).filter(values[:50]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together[50:], PermutohedralLattice(b).filter(values[50:]), rtol=1e-5, atol=1e-6)


def test_normalised_kernel_adjoint_is_the_transpose():
    torch.manual_seed(3)
    features = torch.cat([grid_positions(9, 11) / 3.0, torch.rand(99, 2)], dim=1)
    kernel = NormalisedKernel(PermutohedralLattice(features))
    x, y = torch.rand(99, 4), torch.rand(99, 4)
    assert float((kernel(x) * y).sum()) == pytest.approx(float((x * kernel.adjoint(y)).sum()), rel=1e-5)
    x.requires_grad_(True)
    (kernel(x, weight=2.0) * y).sum().backward()
    torch.testing.assert_close(x.grad, 2.0 * kernel.adjoint(y))
    # Row-normalised: a constant stays (nearly) constant, D^-1/2 K D^-1/2 1 = D^1/2 / D^1/2 in the interior.
    assert float(kernel(torch.ones(99, 1)).std()) < 0.2


def test_bad_features_raise():
    with pytest.raises(ValueError, match="P x d"):
        PermutohedralLattice(torch.rand(10))
    with pytest.raises(ValueError, match="P x d"):
        PermutohedralLattice(torch.rand(10, 15))
    with pytest.raises(ValueError, match="P x d"):
        PermutohedralLattice(torch.rand(0, 3))
    with pytest.raises(ValueError, match="finite"):
        PermutohedralLattice(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="one row per lattice point"):
        PermutohedralLattice(torch.rand(10, 2)).filter(torch.rand(9, 1))


def reference_filter(features: list[list[float]], values: list[list[float]]) -> list[list[float]]:
    """The lattice filter point by point, as Krahenbuhl's permutohedral.cpp writes it (hash
    table of vertex keys, explicit rounding, ranking and wrap-around): an independent check of
    the vectorised build, which derives the same simplexes and weights differently."""
    d = len(features[0])
    scale = [math.sqrt(2.0 / 3.0) * (d + 1) / math.sqrt((i + 1) * (i + 2)) for i in range(d)]
    table: dict[tuple[int, ...], list[float]] = {}
    splats = []
    for f, v in zip(features, values):
        elevated = [0.0] * (d + 1)
        total = 0.0
        for j in range(d, 0, -1):
            cf = f[j - 1] * scale[j - 1]
            elevated[j] = total - j * cf
            total += cf
        elevated[0] = total
        rem0 = []
        for e in elevated:
            up, down = math.ceil(e / (d + 1)) * (d + 1), math.floor(e / (d + 1)) * (d + 1)
            rem0.append(up if up - e < e - down else down)
        s = sum(rem0) // (d + 1)
        rank = [0] * (d + 1)
        for i in range(d + 1):
            for j in range(i + 1, d + 1):
                if elevated[i] - rem0[i] < elevated[j] - rem0[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            if s > 0 and rank[i] >= d + 1 - s:
                rem0[i] -= d + 1
                rank[i] += s - (d + 1)
            elif s < 0 and rank[i] < -s:
                rem0[i] += d + 1
                rank[i] += d + 1 + s
            else:
                rank[i] += s
        barycentric = [0.0] * (d + 2)
        for i in range(d + 1):
            offset = (elevated[i] - rem0[i]) / (d + 1)
            barycentric[d - rank[i]] += offset
            barycentric[d - rank[i] + 1] -= offset
        barycentric[0] += 1.0 + barycentric[d + 1]
        keys = [tuple(rem0[i] + (r if rank[i] <= d - r else r - (d + 1)) for i in range(d)) for r in range(d + 1)]
        for key, weight in zip(keys, barycentric):
            cell = table.setdefault(key, [0.0] * len(v))
            for c, x in enumerate(v):
                cell[c] += weight * x
        splats.append((keys, barycentric[: d + 1]))
    for j in range(d + 1):
        blurred = {}
        for key, cell in table.items():
            lower = tuple(k + d if i == j else k - 1 for i, k in enumerate(key))
            upper = tuple(k - d if i == j else k + 1 for i, k in enumerate(key))
            zero = [0.0] * len(cell)
            blurred[key] = [x + 0.5 * (a + b) for x, a, b in zip(cell, table.get(lower, zero), table.get(upper, zero))]
        table = blurred
    alpha = 1.0 / (1.0 + 2.0 ** (-d))
    return [
        [alpha * sum(w * table[key][c] for key, w in zip(keys, weights)) for c in range(len(values[0]))]
        for keys, weights in splats
    ]


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_matches_the_reference_lattice_point_by_point(d):
    check_against_reference(d)


def test_wide_keys_group_points_with_two_sorts(monkeypatch):
    # Keys too wide for one int64 (many images, high dimensions) take the two-sort path.
    monkeypatch.setattr(lattice_module, "SINGLE_KEY_LIMIT", 0)
    check_against_reference(5)


def test_splat_in_blocks_of_points_gives_the_same_filter(monkeypatch):
    # Large images split the splat by blocks of points (see _points_per_splat_block); here with
    # blocks of 16 points, including a last, shorter block.
    monkeypatch.setattr(lattice_module, "_points_per_splat_block", lambda num_points, num_vertices: 16)
    check_against_reference(5)
    lattice = PermutohedralLattice(torch.rand(100, 3) * 3)
    assert lattice.point_blocks == 7
    test_normalised_kernel_adjoint_is_the_transpose()


def check_against_reference(d: int) -> None:
    # Spread-out features (many simplexes, points that round off the plane both ways),
    # clustered ones (many points per simplex) and a grid of zeros and halves (ties between
    # offsets, broken towards the earlier coordinate), as three images of one lattice.
    generator = torch.Generator().manual_seed(d)
    spread = torch.randn(60, d, generator=generator) * 3
    clustered = torch.randn(60, d, generator=generator) * 0.4 + 1.0
    grid = torch.randint(0, 2, (60, d), generator=generator) * 0.5
    images = [spread, clustered, grid]
    values = [torch.rand(60, 2, generator=generator) for _ in images]
    lattice = PermutohedralLattice(torch.cat(images), torch.arange(3).repeat_interleave(60))
    got = lattice.filter(torch.cat(values))
    expected = torch.tensor(sum((reference_filter(f.tolist(), v.tolist()) for f, v in zip(images, values)), []))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lattice.row_sums(), lattice.filter(torch.ones(180, 1)), rtol=1e-5, atol=1e-6)
