"""The engine's CRF hooks: Predictor(crf=...) and evaluate(crf=...) refine with seglab.crf."""
import torch
from torch.utils.data import DataLoader

from seglab import create_model
from seglab.crf import make_crf, refine
from seglab.engine.evaluator import Normalize, evaluate
from seglab.engine.predictor import Predictor

CONFIG = {"classes": ["a", "b", "c"], "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]], "mean": [0.5] * 3, "std": [0.25] * 3}


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("unet", num_classes=3, base_channels=4, depth=2).eval()


def test_predictor_refines_its_probabilities_with_the_crf():
    image = torch.rand(3, 24, 32)
    params = {"theta_alpha": 20.0, "iterations": 2}
    plain = Predictor(tiny_model(), CONFIG, device="cpu").predict_proba(image)
    refined = Predictor(tiny_model(), CONFIG, device="cpu", crf=params).predict_proba(image)
    torch.testing.assert_close(refined, refine(image, plain, params), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(refined, plain, atol=1e-3)


class NoisyHalves(torch.nn.Module):
    """Scores that favour the true half (left = class 0, right = class 1) under heavy noise."""

    def __init__(self, noise: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("noise", noise)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = self.noise[: images.shape[0]].clone()
        scores[:, 0, :, :16] += 1.0
        scores[:, 1, :, 16:] += 1.0
        return scores


def test_evaluate_scores_the_refined_predictions():
    generator = torch.Generator().manual_seed(1)
    image = torch.zeros(3, 24, 32)
    image[0, :, 16:] = 1.0
    mask = torch.zeros(24, 32, dtype=torch.long)
    mask[:, 16:] = 1
    loader = DataLoader([{"image": image, "mask": mask}] * 3, batch_size=2)
    model = NoisyHalves(1.5 * torch.randn(2, 3, 24, 32, generator=generator))
    options = {"num_classes": 3, "ignore_index": 255, "normalize": Normalize(CONFIG["mean"], CONFIG["std"]), "device": torch.device("cpu")}
    crf = make_crf({"theta_alpha": 20.0, "iterations": 3})
    with_crf = evaluate(model, loader, crf=crf, **options)
    without = evaluate(model, loader, **options)
    expected_matrix = torch.zeros(3, 3, dtype=torch.int64)
    for batch in loader:
        refined = crf(batch["image"], model(batch["image"]).softmax(dim=1))
        flat = batch["mask"].reshape(-1) * 3 + refined.argmax(dim=1).reshape(-1)
        expected_matrix += torch.bincount(flat, minlength=9).reshape(3, 3)
    assert with_crf["pixel_accuracy"] == float(expected_matrix.diag().sum() / expected_matrix.sum())
    assert with_crf["pixel_accuracy"] > without["pixel_accuracy"] + 0.1  # the CRF cleans the noise up
