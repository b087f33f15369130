"""ConfusionMatrix: hand-worked cases, properties, and torchmetrics / smp side by side.

Definitions matched: IoU_c = TP/(TP+FP+FN) and Dice_c = 2TP/(2TP+FP+FN) from counts summed over
the whole data set (Pascal VOC / Cityscapes protocol); NaN for classes absent from prediction and
target, left out of the means.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seglab.metrics import ConfusionMatrix

FAST = settings(max_examples=30, deadline=None)


def test_hand_computed_multiclass():
    # 3 classes, 8 pixels, one ignored (255). Counting by hand (rows = truth, cols = prediction):
    #   truth 0: predicted 0, 0, 1      truth 1: predicted 1, 2      truth 2: predicted 2, 2
    target = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 255]])
    pred = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    r = cm.compute()
    assert r["confusion_matrix"].tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 2]]
    # IoU: class 0 = 2/(2+0+1), class 1 = 1/(1+1+1), class 2 = 2/(2+1+0)
    assert r["iou"].tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3])
    assert r["dice"].tolist() == pytest.approx([4 / 5, 2 / 4, 4 / 5])
    assert r["accuracy"].tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert r["precision"].tolist() == pytest.approx([1.0, 1 / 2, 2 / 3])
    assert r["pixel_accuracy"] == pytest.approx(5 / 7)
    assert r["mean_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert r["miou"] == pytest.approx(5 / 9)
    assert r["fwiou"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 3 + 2 * 2 / 3) / 7)
    # Micro: TP 5, FP 2, FN 2 summed over classes.
    assert r["micro_iou"] == pytest.approx(5 / 9)
    assert r["micro_dice"] == pytest.approx(10 / 14)
    assert r["micro_precision"] == pytest.approx(r["pixel_accuracy"])


def test_absent_class_is_nan_and_left_out_of_means():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 0]]))
    r = cm.compute()
    assert math.isnan(r["iou"][2]) and math.isnan(r["iou"][3]) and math.isnan(r["dice"][3])
    assert r["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_logits_equal_indices():
    logits = torch.randn(2, 5, 6, 7)
    target = torch.randint(0, 5, (2, 6, 7))
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.compute()["confusion_matrix"], b.compute()["confusion_matrix"])


def test_binary_hand_computed():
    # Probabilities thresholded at 0.5; foreground TP 2, FP 1, FN 1; background TP 1.
    probs = torch.tensor([[[0.9, 0.8, 0.7, 0.2, 0.1]]])
    target = torch.tensor([[[1, 1, 0, 1, 0]]])
    cm = ConfusionMatrix(1, task="binary")
    cm.update(probs, target)
    r = cm.compute()
    assert r["iou"].tolist() == pytest.approx([1 / 3, 2 / 4])
    assert r["dice"][1] == pytest.approx(4 / 6)


def test_multilabel_hand_computed_with_ignored_entry():
    pred = torch.tensor([[[[1, 1, 0]], [[0, 1, 1]]]])  # N=1, K=2, H=1, W=3
    target = torch.tensor([[[[1, 0, 255]], [[0, 1, 1]]]])
    cm = ConfusionMatrix(2, task="multilabel")
    cm.update(pred, target)
    r = cm.compute()
    assert r["confusion_matrix"][0].tolist() == [[0, 1], [0, 1]]  # label 0: TP 1, FP 1, third ignored
    assert r["iou"].tolist() == pytest.approx([1 / 2, 1.0])
    assert r["pixel_accuracy"] == pytest.approx(4 / 5)


def test_bad_input_is_a_clear_error():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[5]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="task"):
        ConfusionMatrix(3, task="multi")


@st.composite
def label_maps(draw, max_classes=5):
    k = draw(st.integers(2, max_classes))
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, (n, h, w), generator=g)
    pred = torch.randint(0, k, (n, h, w), generator=g)
    ignored = torch.rand(n, h, w, generator=g) < 0.2
    return k, pred, target.masked_fill(ignored, 255)


@FAST
@given(label_maps())
def test_perfect_prediction_scores_one(case):
    k, _, target = case
    cm = ConfusionMatrix(k)
    cm.update(target.clamp(max=k - 1), target)
    r = cm.compute()
    if r["confusion_matrix"].sum() > 0:
        assert r["miou"] == pytest.approx(1.0) and r["pixel_accuracy"] == pytest.approx(1.0)
        assert r["mdice"] == pytest.approx(1.0) and r["fwiou"] == pytest.approx(1.0)


@FAST
@given(label_maps())
def test_bounds_and_dice_iou_identity(case):
    k, pred, target = case
    cm = ConfusionMatrix(k)
    cm.update(pred, target)
    r = cm.compute()
    for key in ("iou", "dice", "accuracy", "precision"):
        values = r[key][~r[key].isnan()]
        assert ((values >= 0) & (values <= 1)).all()
    present = ~r["iou"].isnan()
    assert torch.allclose(r["dice"][present], 2 * r["iou"][present] / (1 + r["iou"][present]))


@FAST
@given(label_maps())
def test_order_invariance_and_batching_equals_one_update(case):
    k, pred, target = case
    whole, forward, backward = ConfusionMatrix(k), ConfusionMatrix(k), ConfusionMatrix(k)
    whole.update(pred, target)
    for i in range(len(pred)):
        forward.update(pred[i : i + 1], target[i : i + 1])
        backward.update(pred[len(pred) - 1 - i : len(pred) - i], target[len(pred) - 1 - i : len(pred) - i])
    assert torch.equal(whole.matrix, forward.matrix) and torch.equal(whole.matrix, backward.matrix)


@FAST
@given(label_maps())
def test_ignored_pixels_change_nothing(case):
    k, pred, target = case
    a, b = ConfusionMatrix(k), ConfusionMatrix(k)
    a.update(pred, target)
    b.update(torch.where(target == 255, (pred + 1) % k, pred), target)  # change only ignored pixels
    assert torch.equal(a.matrix, b.matrix)


@FAST
@given(label_maps())
def test_matches_torchmetrics_on_one_image(case):
    """torchmetrics MeanIoU / GeneralizedDiceScore average per-image scores over images, while
    we sum counts over the data set (VOC protocol); on one image the two definitions coincide.
    torchmetrics has no ignore_index, so ignored pixels are given class 0 for both."""
    from torchmetrics.segmentation import GeneralizedDiceScore, MeanIoU

    k, pred, target = case
    pred, target = pred[:1], target[:1].masked_fill(target[:1] == 255, 0)
    cm = ConfusionMatrix(k)
    cm.update(pred, target)
    r = cm.compute()
    tm_iou = MeanIoU(num_classes=k, per_class=True, include_background=True, input_format="index")(pred, target)
    present = ~r["iou"].isnan()
    assert torch.allclose(tm_iou[present].double(), r["iou"][present], atol=1e-6)
    assert (tm_iou[~present] == -1).all()  # torchmetrics marks absent classes with -1, we use NaN
    in_target = r["support"] > 0  # GeneralizedDiceScore's per-class weights need target pixels
    gds = GeneralizedDiceScore(num_classes=k, per_class=True, include_background=True, input_format="index")(pred, target)
    assert torch.allclose(gds[in_target].double(), r["dice"][in_target], atol=1e-6)


def test_matches_segmentation_models_pytorch_stats():
    """smp.metrics.get_stats counts TP/FP/FN per image and class with the same ignore rule; its
    "macro" reduction (stats summed over images, then mean over classes) is our mIoU when every
    class occurs (smp scores an absent class 0 or 1 by zero_division, we leave it out as NaN)."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 16, 16), generator=g)
    pred = torch.randint(0, 4, (3, 16, 16), generator=g)
    target[0, :3] = 255
    tp, fp, fn, tn = smp.metrics.get_stats(pred, target, mode="multiclass", num_classes=4, ignore_index=255)
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    r = cm.compute()
    m = r["confusion_matrix"]
    assert tp.sum(0).tolist() == m.diag().tolist()
    assert fp.sum(0).tolist() == (m.sum(0) - m.diag()).tolist()
    assert fn.sum(0).tolist() == (m.sum(1) - m.diag()).tolist()
    assert float(smp.metrics.iou_score(tp, fp, fn, tn, reduction="macro")) == pytest.approx(r["miou"])
    assert float(smp.metrics.f1_score(tp, fp, fn, tn, reduction="macro")) == pytest.approx(r["mdice"])
    assert float(smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro")) == pytest.approx(r["micro_iou"])
