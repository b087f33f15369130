"""Soft IoU / soft Dice in the L1 and squared-L2 forms, hand-computed and by property."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seglab.metrics import ConfusionMatrix, SoftOverlap, soft_dice, soft_iou

FAST = settings(max_examples=25, deadline=None)


def test_hand_computed_l1_and_l2():
    # One class, four pixels: Y = (1, 1, 0, 0), P = (0.5, 1, 0.5, 0).
    probs = torch.tensor([[[0.5, 1.0, 0.5, 0.0]]])
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    # L1: <Y,P> = 1.5, |Y| = 2, |P| = 2 -> IoU 1.5 / 2.5, Dice 3 / 4.
    assert float(soft_iou(probs, target, norm="l1")) == pytest.approx(1.5 / 2.5)
    assert float(soft_dice(probs, target, norm="l1")) == pytest.approx(3 / 4)
    # L2: |Y|^2 = 2, |P|^2 = 0.25 + 1 + 0.25 = 1.5 -> IoU 1.5 / 2, Dice 3 / 3.5.
    assert float(soft_iou(probs, target, norm="l2")) == pytest.approx(1.5 / 2.0)
    assert float(soft_dice(probs, target, norm="l2")) == pytest.approx(3 / 3.5)


def test_streaming_multiclass_with_ignore_hand_computed():
    probs = torch.tensor([[[[0.8, 0.3, 0.5]], [[0.2, 0.7, 0.5]]]])  # N=1, K=2, H=1, W=3
    target = torch.tensor([[[0, 1, 255]]])  # third pixel ignored
    metric = SoftOverlap(2)
    metric.update(probs, target)
    r = metric.compute()
    # class 0: <Y,P> = 0.8, |Y| = 1, |P| = 1.1 ; class 1: <Y,P> = 0.7, |Y| = 1, |P| = 0.9
    assert r["soft_iou"].tolist() == pytest.approx([0.8 / 1.3, 0.7 / 1.2])
    assert r["soft_dice"].tolist() == pytest.approx([1.6 / 2.1, 1.4 / 1.9])
    assert r["micro_soft_iou"] == pytest.approx(1.5 / 2.5)


def test_binary_logits_and_absent_class_nan():
    metric = SoftOverlap(1, task="binary", from_logits=True)
    metric.update(torch.full((1, 1, 2, 2), -1e4), torch.zeros(1, 2, 2, dtype=torch.long))
    assert math.isnan(float(metric.compute()["soft_iou"][0]))


@st.composite
def soft_cases(draw):
    k, n, h, w = draw(st.integers(2, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    probs = torch.randn(n, k, h, w, generator=g).mul(3).softmax(1)
    target = torch.randint(0, k, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < 0.2] = 255
    return k, probs, target, draw(st.sampled_from(["l1", "l2"]))


@FAST
@given(soft_cases())
def test_properties(case):
    k, probs, target, norm = case
    metric = SoftOverlap(k, norm=norm)
    metric.update(probs, target)
    r = metric.compute()
    iou, dice = r["soft_iou"], r["soft_dice"]
    ok = ~iou.isnan()
    assert ((iou[ok] >= 0) & (iou[ok] <= 1 + 1e-12)).all()
    assert torch.allclose(dice[ok], 2 * iou[ok] / (1 + iou[ok]))
    # Streaming in any order / one image at a time gives the same sums.
    parts = SoftOverlap(k, norm=norm)
    for i in reversed(range(len(probs))):
        parts.update(probs[i : i + 1], target[i : i + 1])
    assert torch.allclose(parts.terms, metric.terms)
    # Ignored pixels change nothing.
    other = SoftOverlap(k, norm=norm)
    other.update(torch.where((target == 255).unsqueeze(1), probs.flip(1), probs), target)
    assert torch.allclose(other.terms, metric.terms)


@FAST
@given(soft_cases())
def test_hard_probabilities_give_the_hard_iou(case):
    k, probs, target, norm = case
    hard = torch.nn.functional.one_hot(probs.argmax(1), k).permute(0, 3, 1, 2).double()
    metric, confusion = SoftOverlap(k, norm=norm), ConfusionMatrix(k)
    metric.update(hard, target)
    confusion.update(hard.argmax(1), target)
    expected = confusion.compute()["iou"]
    assert torch.allclose(metric.compute()["soft_iou"], expected, equal_nan=True)
    # And a perfect prediction scores 1 for every class that occurs.
    perfect = SoftOverlap(k, norm=norm)
    perfect.update(torch.nn.functional.one_hot(target.clamp(max=k - 1), k).permute(0, 3, 1, 2).double(), target)
    scores = perfect.compute()["soft_iou"]
    assert torch.all(scores[~scores.isnan()] == 1)
