"""PR curve and Average Precision on probabilistic masks, vs hand counts and torchmetrics.

Definition matched: AP = sum_n (R_n - R_{n-1}) P_n over the thresholds given by the distinct
scores (no interpolation), as torchmetrics' BinaryAveragePrecision and scikit-learn define it;
binned mode = torchmetrics' `thresholds=T` (pixel detected when score >= threshold).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seglab.metrics import AveragePrecision, average_precision, precision_recall_curve

FAST = settings(max_examples=20, deadline=None)


def test_hand_computed_curve_and_ap():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    target = torch.tensor([1, 0, 1, 0, 255])  # the last pixel is ignored
    precision, recall, thresholds = precision_recall_curve(scores, target)
    assert thresholds.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert precision.tolist() == pytest.approx([1, 1 / 2, 2 / 3, 2 / 4])
    assert recall.tolist() == pytest.approx([1 / 2, 1 / 2, 1, 1])
    # AP = 0.5 * 1 + 0 * 1/2 + 0.5 * 2/3 + 0 * 2/4
    assert average_precision(scores, target) == pytest.approx(0.5 + 1 / 3)


def test_ties_form_one_threshold_and_no_positive_is_nan():
    precision, recall, _ = precision_recall_curve(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1, 0, 0]))
    assert precision.tolist() == pytest.approx([1 / 3]) and recall.tolist() == [1.0]
    assert math.isnan(average_precision(torch.rand(4), torch.zeros(4, dtype=torch.long)))


@st.composite
def scored_pixels(draw):
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(2, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = (torch.rand(n, h, w, generator=g) * 20).round() / 20  # ties are common
    target = (torch.rand(n, h, w, generator=g) < scores).long()
    target[torch.rand(n, h, w, generator=g) < 0.15] = 255
    return scores, target


@FAST
@given(scored_pixels(), st.sampled_from([None, 5, 21]))
def test_matches_torchmetrics_and_streams(case, thresholds):
    from torchmetrics.classification import BinaryAveragePrecision

    scores, target = case
    metric = AveragePrecision(thresholds=thresholds)
    for i in reversed(range(len(scores))):  # streamed, in reverse order
        metric.update(scores[i : i + 1], target[i : i + 1])
    ours = metric.compute()["map"]
    if not ((target == 1).any()):
        assert math.isnan(ours)
        return
    reference = float(BinaryAveragePrecision(thresholds=thresholds, ignore_index=255)(scores, target))
    assert ours == pytest.approx(reference, abs=1e-6)
    assert 0 <= ours <= 1


def test_perfect_scores_give_one_and_multiclass_map():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 5, 5), generator=g)
    target[0, 0] = 255
    probs = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    metric = AveragePrecision(3, task="multiclass")
    metric.update(probs, target)
    assert metric.compute()["ap"].tolist() == [1.0, 1.0, 1.0]
    # One-vs-rest: the per-class AP equals the binary AP of that class's channel.
    noisy = torch.rand(2, 3, 5, 5, generator=g).softmax(1)
    metric = AveragePrecision(3, task="multiclass")
    metric.update(noisy, target)
    r = metric.compute()
    binary_target = torch.where(target == 255, 255, (target == 1).long())
    assert float(r["ap"][1]) == pytest.approx(average_precision(noisy[:, 1], binary_target))
    assert r["map"] == pytest.approx(float(r["ap"].mean()))
