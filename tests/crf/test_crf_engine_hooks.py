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


def test_evaluate_scores_the_refined_predictions():
    torch.manual_seed(1)
    samples = [{"image": torch.rand(3, 24, 32), "mask": torch.randint(0, 3, (24, 32))} for _ in range(3)]
    loader = DataLoader(samples, batch_size=2)
    options = {"num_classes": 3, "ignore_index": 255, "normalize": Normalize(CONFIG["mean"], CONFIG["std"]), "device": torch.device("cpu")}
    crf = make_crf({"iterations": 2})
    with_crf = evaluate(tiny_model(), loader, crf=crf, **options)
    without = evaluate(tiny_model(), loader, **options)
    model, normalize = tiny_model(), options["normalize"]
    expected_matrix = torch.zeros(3, 3, dtype=torch.int64)
    with torch.no_grad():
        for batch in loader:
            refined = crf(batch["image"], model(normalize(batch["image"])).softmax(dim=1))
            flat = batch["mask"].reshape(-1) * 3 + refined.argmax(dim=1).reshape(-1)
            expected_matrix += torch.bincount(flat, minlength=9).reshape(3, 3)
    accuracy = float(expected_matrix.diag().sum() / expected_matrix.sum())
    assert with_crf["pixel_accuracy"] == accuracy
    assert with_crf["pixel_accuracy"] != without["pixel_accuracy"]
