"""CRF as RNN (Zheng et al. 2015): a differentiable, trainable mean-field layer."""
import pytest
import torch

from seglab.crf import CRFasRNN


def toy_batch(seed: int = 0):
    """Two images split into a left and a right region of different colour; labels follow."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(2, 3, 16, 20)
    image[:, 0, :, 10:] = 1.0
    image = (image + 0.05 * torch.rand(image.shape, generator=g)).clamp(0, 1)
    target = torch.zeros(2, 16, 20, dtype=torch.long)
    target[:, :, 10:] = 1
    logits = torch.randn(2, 3, 16, 20, generator=g)
    return image, logits, target


def test_gradients_reach_logits_and_parameters():
    image, logits, target = toy_batch()
    logits.requires_grad_(True)
    layer = CRFasRNN(3, theta_alpha=10.0, theta_beta=20.0, w1=2.0, w2=1.0, iterations=3)
    out = layer(image, logits)
    assert out.shape == logits.shape
    torch.nn.functional.cross_entropy(out, target).backward()
    for name, grad in [("logits", logits.grad)] + [(n, p.grad) for n, p in layer.named_parameters()]:
        assert grad is not None and bool(torch.isfinite(grad).all()), name
        assert float(grad.abs().sum()) > 0, name


def test_gradient_matches_finite_differences():
    image, logits, target = toy_batch(1)
    layer = CRFasRNN(3, theta_alpha=10.0, theta_beta=20.0, w1=2.0, w2=1.0, iterations=2)
    loss = lambda: torch.nn.functional.cross_entropy(layer(image, logits), target)
    loss().backward()
    analytic = float(layer.compatibility.grad[0, 1])
    eps = 1e-2
    with torch.no_grad():
        layer.compatibility[0, 1] += eps
        up = float(loss())
        layer.compatibility[0, 1] -= 2 * eps
        down = float(loss())
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=0.05, abs=1e-4)


def test_training_the_layer_lowers_the_loss():
    image, logits, target = toy_batch(2)
    layer = CRFasRNN(3, theta_alpha=10.0, theta_beta=20.0, w1=1.0, w2=1.0, iterations=3)
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.1)
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(image, logits), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_bad_inputs_raise():
    image, logits, _ = toy_batch()
    with pytest.raises(ValueError, match="built for 4 classes"):
        CRFasRNN(4)(image, logits)
    with pytest.raises(ValueError, match="same batch size and size"):
        CRFasRNN(3)(image[:, :, :8], logits)
    with pytest.raises(ValueError, match="iterations"):
        CRFasRNN(3, iterations=0)
