"""DenseCRF: agreement with pydensecrf (Krähenbühl's C++), energy, layouts, input checks."""
import itertools

import numpy as np
import pytest
import torch

from seglab.crf import DenseCRF
from seglab.crf import lattice as lattice_module
from seglab.crf.kernels import _smoothness_kernel


def synthetic_scene(h: int, w: int, k: int, seed: int = 0, noise: float = 1.0):
    """Discs of flat colour (plus pixel noise) and noisy unaries that favour the true label."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), dtype=np.int64)
    yy, xx = np.mgrid[:h, :w]
    for label in range(1, k):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(h // 6, h // 2)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = label
    palette = rng.integers(0, 256, (k, 3))
    image = np.clip(palette[labels] + rng.normal(0, 15, (h, w, 3)), 0, 255).astype(np.uint8)
    logits = rng.normal(0, noise, (k, h, w))
    logits[labels, yy, xx] += 1.0
    probabilities = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    return image, probabilities.astype(np.float32), labels


@pytest.mark.parametrize(
    "size, k, kernels",
    [
        ((48, 64), 21, {"theta_alpha": 80.0, "theta_beta": 13.0, "w1": 10.0, "theta_gamma": 3.0, "w2": 3.0}),
        ((40, 56), 5, {"theta_alpha": 20.0, "theta_beta": 8.0, "w1": 4.0, "theta_gamma": 1.5, "w2": 2.0}),
    ],
)
def test_labels_agree_with_pydensecrf(size, k, kernels):
    densecrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (the C++ reference) is not installed")
    h, w = size
    image, probabilities, labels = synthetic_scene(h, w, k, seed=k)
    reference = densecrf.DenseCRF2D(w, h, k)
    reference.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probabilities, 1e-5, 1)).reshape(k, -1)))
    reference.addPairwiseGaussian(sxy=kernels["theta_gamma"], compat=kernels["w2"])
    reference.addPairwiseBilateral(sxy=kernels["theta_alpha"], srgb=kernels["theta_beta"], rgbim=image, compat=kernels["w1"])
    expected = np.array(reference.inference(5)).reshape(k, h, w)

    refined = DenseCRF(**kernels, iterations=5)(torch.from_numpy(image), torch.from_numpy(probabilities)[None])[0]
    agreement = float((refined.argmax(0).numpy() == expected.argmax(0)).mean())
    assert agreement >= 0.995
    np.testing.assert_allclose(refined.numpy(), expected, atol=1e-3)
    # ... and the CRF did something useful: it fixed most of the noisy unary's mistakes.
    assert (refined.argmax(0).numpy() == labels).mean() > (probabilities.argmax(0) == labels).mean() + 0.1


def test_energy_decreases_every_iteration():
    image, probabilities, _ = synthetic_scene(40, 48, 4, seed=3)
    crf = DenseCRF(iterations=6)
    image, scores = torch.from_numpy(image), torch.from_numpy(probabilities)[None]
    energies = [float(crf.energy(image, scores, q)[0]) for q in crf.steps(image, scores)]
    assert len(energies) == 7
    # Every iteration lowers the energy until it has converged to float32 precision (here the
    # last two iterations agree to all seven digits); none ever raises it beyond rounding.
    rounding = 1e-6 * abs(energies[-1])
    assert all(after <= before + rounding for before, after in itertools.pairwise(energies)), energies
    assert all(after < before for before, after in itertools.pairwise(energies[:5])), energies
    assert energies[-1] < energies[0] / 2, energies


def test_batched_equals_one_by_one_and_layouts_agree():
    scenes = [synthetic_scene(24, 32, 3, seed=s) for s in (5, 6)]
    images = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image, _, _ in scenes])
    probabilities = torch.stack([torch.from_numpy(p) for _, p, _ in scenes])
    crf = DenseCRF(theta_alpha=20.0, iterations=3)
    batched = crf(images, probabilities)
    assert batched.shape == probabilities.shape
    for i, (image, p, _) in enumerate(scenes):
        one = crf(torch.from_numpy(image), torch.from_numpy(p))  # H x W x 3 uint8, K x H x W
        assert one.shape == p.shape
        torch.testing.assert_close(batched[i], one, rtol=1e-4, atol=1e-5)
    # A float image in [0, 1] means the same as the uint8 one; logits mean the same as probabilities.
    as_float = crf(images.float() / 255, probabilities)
    as_logits = crf(images, torch.log(probabilities) + 7.0, scores_are="logits")
    torch.testing.assert_close(as_float, batched, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(as_logits, batched, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched.sum(dim=1), torch.ones(2, 24, 32), rtol=1e-5, atol=1e-5)


def test_potts_matrix_equals_potts_and_other_matrices_matter():
    image, probabilities, _ = synthetic_scene(24, 32, 3, seed=7)
    image, scores = torch.from_numpy(image), torch.from_numpy(probabilities)[None]
    potts = DenseCRF(iterations=3)(image, scores)
    as_matrix = DenseCRF(iterations=3, compatibility=1 - torch.eye(3))(image, scores)
    torch.testing.assert_close(as_matrix, potts, rtol=1e-4, atol=1e-5)
    no_pairwise = DenseCRF(iterations=3, compatibility=torch.zeros(3, 3))(image, scores)
    torch.testing.assert_close(no_pairwise, scores, rtol=1e-4, atol=1e-4)


def test_fast_potts_path_matches_the_general_one():
    image, probabilities, _ = synthetic_scene(24, 32, 3, seed=8)
    image, scores = torch.from_numpy(image), torch.from_numpy(probabilities)[None]
    crf = DenseCRF(iterations=3)
    fused = crf(image, scores)  # inference: both kernels fused, exp-normalise
    general = crf(image, scores.clone().requires_grad_(True))  # autograd: kernel by kernel, log_softmax
    assert general.requires_grad
    torch.testing.assert_close(general.detach(), fused, rtol=1e-4, atol=1e-5)
    strong = DenseCRF(w1=30.0, w2=3.0, iterations=3)(image, scores)  # weights too large for the fused path
    assert bool(torch.isfinite(strong).all())
    torch.testing.assert_close(strong.sum(dim=1), torch.ones(1, 24, 32))


def test_splat_blocks_do_not_change_the_result(monkeypatch):
    # Two images in one batch: blocks of points straddle the boundary between them.
    scenes = [synthetic_scene(40, 48, 4, seed=seed) for seed in (9, 10)]
    image = torch.stack([torch.from_numpy(s[0]).permute(2, 0, 1) for s in scenes])
    scores = torch.stack([torch.from_numpy(s[1]) for s in scenes])
    crf = DenseCRF(iterations=4)
    whole = crf(image, scores)
    # Blocks of 100 points for both kernels (the smoothness kernel is cached per size: clear it).
    monkeypatch.setattr(lattice_module, "_points_per_splat_block", lambda num_points, num_vertices: 100)
    _smoothness_kernel.cache_clear()
    blocked = crf(image, scores)
    _smoothness_kernel.cache_clear()
    torch.testing.assert_close(blocked, whole, rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    crf = DenseCRF(iterations=1)
    image = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    probabilities = torch.full((2, 4, 8, 8), 0.25)
    with pytest.raises(ValueError, match="same batch size and size"):
        crf(image, probabilities[:, :, :7])
    with pytest.raises(ValueError, match="same batch size and size"):
        crf(image[:1], probabilities)
    with pytest.raises(ValueError, match="NaN or infinite"):
        crf(image, probabilities.clone().index_fill_(2, torch.tensor([0]), float("nan")))
    with pytest.raises(ValueError, match="image must be"):
        crf(torch.zeros(2, 4, 8, 8), probabilities)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        crf(torch.full((2, 3, 8, 8), 200.0), probabilities)
    with pytest.raises(ValueError, match="probabilities must lie"):
        crf(image, probabilities * 5, scores_are="probabilities")
    with pytest.raises(ValueError, match="compatibility is"):
        DenseCRF(compatibility=torch.eye(3))(image, probabilities)
    with pytest.raises(ValueError, match="theta_alpha"):
        DenseCRF(theta_alpha=0)
    with pytest.raises(ValueError, match="iterations"):
        DenseCRF(iterations=-1)
