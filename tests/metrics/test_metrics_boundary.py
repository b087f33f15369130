"""Boundary IoU (Cheng et al., CVPR 2021) and Trimap IoU.

The reference for Boundary IoU is a per-mask OpenCV implementation of the paper's definition,
written here the way the authors' code describes it: pad by one background pixel, erode
d times with a 3x3 kernel, crop, boundary = mask minus erosion, d = round(0.02 * diagonal).
Our batched torch version must agree pixel for pixel.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seglab.metrics import (
    BoundaryIoU,
    ConfusionMatrix,
    TrimapIoU,
    boundary_iou,
    mask_to_boundary,
)
from seglab.metrics.boundary import boundary_distance

cv2 = pytest.importorskip("cv2")
FAST = settings(max_examples=25, deadline=None)


def opencv_boundary(mask: np.ndarray, dilation_ratio: float) -> np.ndarray:
    h, w = mask.shape
    d = max(1, round(dilation_ratio * math.sqrt(h * h + w * w)))
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
    return mask.astype(np.uint8) - eroded


def test_hand_computed_ring():
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[1:5, 1:5] = True
    band = mask_to_boundary(mask, dilation_ratio=0.1)  # d = round(0.1 * 8.49) = 1
    expected = mask.clone()
    expected[2:4, 2:4] = False
    assert torch.equal(band, expected)
    # A mask touching the image border gets a boundary along the border too (zero padding).
    full = torch.ones(5, 5, dtype=torch.bool)
    assert mask_to_boundary(full, 0.1).sum() == 16


def test_boundary_distance_is_ratio_of_diagonal():
    assert boundary_distance(300, 400) == 10  # 0.02 * 500
    assert boundary_distance(10, 10) == 1  # at least one pixel
    with pytest.raises(ValueError, match="dilation_ratio"):
        boundary_distance(10, 10, 0.0)


@st.composite
def blob_masks(draw):
    h, w = draw(st.integers(3, 40)), draw(st.integers(3, 140))  # > 64: several words per row
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, h // 3 + 1, w // 3 + 1, generator=g)
    masks = torch.nn.functional.interpolate(noise, size=(h, w), mode="bilinear")[0, 0] > 0.5
    return masks, draw(st.sampled_from([0.02, 0.05, 0.1]))


@FAST
@given(blob_masks())
def test_torch_boundary_equals_opencv_reference(case):
    mask, ratio = case
    ours = mask_to_boundary(mask, ratio).numpy().astype(np.uint8)
    reference = opencv_boundary(mask.numpy(), ratio)
    assert np.array_equal(ours, reference)
    # Boundary IoU against a shifted copy, from the same OpenCV bands.
    other = torch.roll(mask, 1, dims=1)
    other_band = opencv_boundary(other.numpy(), ratio)
    union = ((reference + other_band) > 0).sum()
    expected = ((reference * other_band) > 0).sum() / union if union else float("nan")
    assert float(boundary_iou(mask, other, ratio)) == pytest.approx(expected, nan_ok=True)


def test_torch_fallback_used_off_cpu_gives_the_same_bands(monkeypatch):
    from seglab.metrics import boundary

    g = torch.Generator().manual_seed(7)
    masks = torch.nn.functional.interpolate(torch.rand(6, 1, 9, 20, generator=g), size=(36, 150), mode="bilinear")[:, 0] > 0.5
    fast = mask_to_boundary(masks)
    fast_iou = boundary_iou(masks, masks.roll(2, dims=2))
    monkeypatch.setattr(boundary, "NUMPY_ON_CPU", False)
    assert torch.equal(mask_to_boundary(masks), fast)
    assert torch.allclose(boundary_iou(masks, masks.roll(2, dims=2)), fast_iou, equal_nan=True)


def test_boundary_iou_hand_and_edge_cases():
    a = torch.zeros(2, 10, 10, dtype=torch.bool)
    a[0, 2:8, 2:8] = True
    b = a.clone()
    b[1, 0:3, 0:3] = True  # second pair: a is empty, b is not
    iou = boundary_iou(a, b, dilation_ratio=0.05)  # d = 1
    assert iou[0] == 1.0 and iou[1] == 0.0
    assert math.isnan(float(boundary_iou(a[1], a[1])))  # both empty: 0/0
    shifted = torch.zeros(10, 10, dtype=torch.bool)
    shifted[2:8, 3:9] = True
    # 6x6 rings of 20 pixels each, shifted by one column: they share 5 pixels of the top row
    # and 5 of the bottom row, and no column, so 10 / (20 + 20 - 10).
    assert float(boundary_iou(shifted, a[0], 0.05)) == pytest.approx(10 / 30)


def test_semantic_boundary_iou_perfect_batched_and_ignored():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(3, 4, 4, 4, generator=g)
    target = torch.nn.functional.interpolate(noise, size=(24, 24), mode="bilinear").argmax(1)
    metric = BoundaryIoU(4)
    metric.update(target, target)
    r = metric.compute()
    present = ~r["boundary_iou"].isnan()
    assert torch.all(r["boundary_iou"][present] == 1.0) and r["mboundary_iou"] == 1.0
    pred = torch.randint(0, 4, target.shape, generator=g)
    whole, parts = BoundaryIoU(4), BoundaryIoU(4)
    whole.update(pred, target)
    for i in (2, 0, 1):
        parts.update(pred[i : i + 1], target[i : i + 1])
    assert torch.equal(whole.intersection, parts.intersection) and torch.equal(whole.union, parts.union)
    # Per class on one image without ignore it is boundary_iou of the class masks with counts summed.
    one = BoundaryIoU(4)
    one.update(pred[:1], target[:1])
    direct = boundary_iou(pred[0] == 2, target[0] == 2)
    assert float(one.compute()["boundary_iou"][2]) == pytest.approx(float(direct))
    ignored = target.clone()
    ignored[:, :5] = 255
    a, b = BoundaryIoU(4), BoundaryIoU(4)
    a.update(pred, ignored)
    b.update(torch.where(ignored == 255, (pred + 1) % 4, pred), ignored)
    assert torch.equal(a.intersection, b.intersection) and torch.equal(a.union, b.union)


def test_trimap_hand_computed():
    # One row of 8 pixels, boundary between pixels 3 and 4: with width 1 the band is 2..5.
    target = torch.tensor([[[0, 0, 0, 0, 1, 1, 1, 1]]])
    pred = torch.tensor([[[1, 0, 0, 1, 1, 1, 1, 0]]])  # errors at 0 (outside), 3 (inside), 7 (outside)
    trimap = TrimapIoU(2, width=1)
    assert trimap.band(target)[0, 0].tolist() == [False, False, True, True, True, True, False, False]
    trimap.update(pred, target)
    r = trimap.compute()
    assert r["confusion_matrix"].tolist() == [[1, 1], [0, 2]]
    assert r["iou"].tolist() == pytest.approx([1 / 2, 2 / 3])


def test_trimap_wide_band_is_plain_confusion_matrix():
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 3, (2, 12, 12), generator=g)
    target[0, :2] = 255
    pred = torch.randint(0, 3, (2, 12, 12), generator=g)
    trimap, plain = TrimapIoU(3, width=30), ConfusionMatrix(3)
    trimap.update(pred, target)
    plain.update(pred, target)
    assert torch.equal(trimap.compute()["confusion_matrix"], plain.compute()["confusion_matrix"])


@pytest.mark.parametrize(
    "height, width, ratio",
    [(20, 37, 0.05), (33, 129, 0.02), (64, 64, 0.1), (40, 200, 0.1), (50, 300, 0.06), (100, 100, 0.15),
     (120, 260, 0.25), (150, 400, 0.3)],
)
def test_cpu_word_layout_matches_the_torch_path(monkeypatch, height, width, ratio):
    """The numpy word planes (several chunks) and the torch packed path count the same pixels,
    with and without ignored pixels; the last cases have radii of 21, 72 and 128 pixels (shifts
    of more than a word, and of exactly two words)."""
    from seglab.metrics import _boundary_cpu, boundary

    monkeypatch.setattr(_boundary_cpu, "CHUNK_PIXELS", 3 * height * width)  # several chunks
    numpy_calls = []
    counting = _boundary_cpu.band_counts
    monkeypatch.setattr(_boundary_cpu, "band_counts", lambda *a, **k: numpy_calls.append(1) or counting(*a, **k))
    g = torch.Generator().manual_seed(height * width)
    noise = torch.rand(10, 1, height // 4 + 2, width // 4 + 2, generator=g)
    masks = torch.nn.functional.interpolate(noise, size=(height, width), mode="bilinear")[:, 0]
    pred, target = masks > 0.5, masks.roll(1, dims=0) > 0.45
    labels = (masks * 3).long().clamp(max=2)
    labels[:, : height // 3, : width // 2] = 255
    scores = torch.rand(10, 3, height, width, generator=g)

    def counts():
        semantic = BoundaryIoU(3, ratio)
        semantic.update(scores, labels)
        return boundary_iou(pred, target, ratio), semantic.intersection.clone(), semantic.union.clone()

    fast = counts()
    assert len(numpy_calls) == 1 + len(labels)  # boundary_iou, then BoundaryIoU.update per image
    monkeypatch.setattr(boundary, "NUMPY_ON_CPU", False)
    slow = counts()
    assert len(numpy_calls) == 1 + len(labels)
    assert torch.allclose(fast[0], slow[0], equal_nan=True)
    assert torch.equal(fast[1], slow[1]) and torch.equal(fast[2], slow[2])
