"""Losses: hand-worked values, properties (perfect prediction, bounds, ignore_index), the
build_loss grammar, and side-by-side values with torch and segmentation_models_pytorch where the
definitions coincide (differences on purpose are named in each test)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seglab.losses import (
    LOSS_NAMES,
    BCELoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    JaccardLoss,
    LovaszHingeLoss,
    LovaszSoftmaxLoss,
    TverskyLoss,
    WeightedSum,
    build_loss,
)

FAST = settings(max_examples=20, deadline=None)
LN = math.log


# ---------- hand-worked values ----------

def test_cross_entropy_hand_values():
    logits = torch.tensor([[LN(1.0), LN(3.0)], [LN(1.0), LN(3.0)]]).T.reshape(1, 2, 1, 2)  # p = (0.25, 0.75)
    target = torch.tensor([[[1, 0]]])
    assert float(CrossEntropyLoss()(logits, target)) == pytest.approx((-LN(0.75) - LN(0.25)) / 2)
    # Class weights: weighted mean, divided by the weights of the counted pixels.
    weighted = CrossEntropyLoss(class_weights=[1.0, 3.0])(logits, target)
    assert float(weighted) == pytest.approx((3 * -LN(0.75) + 1 * -LN(0.25)) / 4)
    # Label smoothing eps: (1 - eps) * CE + eps * mean over classes of -log p.
    smoothed = CrossEntropyLoss(label_smoothing=0.2)(logits[..., :1], target[..., :1])
    assert float(smoothed) == pytest.approx(0.8 * -LN(0.75) + 0.2 * (-LN(0.25) - LN(0.75)) / 2)


def test_binary_losses_hand_values():
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1, 1], [0, 0]]])
    assert float(BCELoss()(logits, target)) == pytest.approx(LN(2))
    # Focal, p_t = 0.5, gamma 2, alpha 0.25: 0.25 * ln2 * (0.25 for positives, 0.75 for negatives), mean.
    assert float(FocalLoss("binary", gamma=2, alpha=0.25)(logits, target)) == pytest.approx(0.25 * LN(2) * 0.5)
    # <Y,P> = 1, |P|_1 = 2, |P|_2^2 = 1, |Y| = 2 (smooth 0).
    assert float(DiceLoss("binary", smooth=0)(logits, target)) == pytest.approx(1 - 2 / 4)
    assert float(DiceLoss("binary", norm="l2", smooth=0)(logits, target)) == pytest.approx(1 - 2 / 3)
    assert float(JaccardLoss("binary", smooth=0)(logits, target)) == pytest.approx(1 - 1 / 3)
    # TP = FP = FN = 1: TI = 1 / (1 + 0.3 + 0.7).
    assert float(TverskyLoss("binary", smooth=0)(logits, target)) == pytest.approx(0.5)
    assert float(TverskyLoss("binary", smooth=0, gamma=0.75)(logits, target)) == pytest.approx(0.5**0.75)


def test_focal_multiclass_hand_value_and_gamma_zero_is_ce():
    logits = torch.tensor([LN(1.0), LN(3.0)]).view(1, 2, 1, 1)
    target = torch.tensor([[[1]]])
    assert float(FocalLoss(gamma=2)(logits, target)) == pytest.approx(0.25**2 * -LN(0.75))
    x, t = torch.randn(2, 4, 5, 5), torch.randint(0, 4, (2, 5, 5))
    t[0, 0] = 255
    assert float(FocalLoss(gamma=0)(x, t)) == pytest.approx(float(F.cross_entropy(x, t, ignore_index=255)), rel=1e-5)


def test_lovasz_hinge_hand_value():
    # errors 1 - f*s: (-1, 1.5) -> sorted (1.5, -1); Jaccard gradient (0.5, 0.5); loss 1.5 * 0.5.
    logits = torch.tensor([2.0, -0.5]).view(1, 1, 1, 2)
    target = torch.tensor([[[1, 1]]])
    assert float(LovaszHingeLoss()(logits, target)) == pytest.approx(0.75)


def test_lovasz_softmax_hand_value():
    # Two pixels, both class 0, p0 = (0.5, 1.0): errors (0.5, 0) -> gradient (0.5, 0.5) -> 0.25.
    probs = torch.tensor([[0.5, 1.0], [0.5, 0.0]])  # K x pixels
    logits = probs.clamp(min=1e-12).log().view(1, 2, 1, 2)
    target = torch.zeros(1, 1, 2, dtype=torch.long)
    assert float(LovaszSoftmaxLoss()(logits, target)) == pytest.approx(0.25, abs=1e-6)


# ---------- torch and smp side by side ----------

def _batch(seed, k=3, n=2, size=6, all_present=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, size, size, generator=g)
    target = torch.randint(0, k, (n, size, size), generator=g)
    if all_present:
        target[0, 0, :k] = torch.arange(k)
    target[1, -1] = 255
    return logits, target


def test_cross_entropy_equals_torch():
    logits, target = _batch(0)
    w = torch.tensor([0.5, 1.0, 2.0])
    ours = CrossEntropyLoss(class_weights=w, label_smoothing=0.1)(logits, target)
    assert float(ours) == pytest.approx(float(F.cross_entropy(logits, target, weight=w, ignore_index=255, label_smoothing=0.1)), rel=1e-5)


@pytest.mark.parametrize("per_image", [False, True])
def test_matches_smp_where_definitions_coincide(per_image):
    """smp zeroes Dice/Jaccard/Tversky terms of classes absent from the target (we keep them)
    and applies focal Tversky's gamma to the class mean (we to each class); with every class
    present, smooth 0 and gamma 1 the definitions coincide. smp's Dice has no per-image option,
    so only the per-batch form is compared for it. smp's binary focal is Lin et al.'s."""
    smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")
    logits, target = _batch(1)
    if not per_image:
        pairs = [
            (DiceLoss(smooth=0), smp_losses.DiceLoss("multiclass", ignore_index=255)),
            (JaccardLoss(smooth=0), smp_losses.JaccardLoss("multiclass", ignore_index=255)),
            (TverskyLoss(alpha=0.3, beta=0.7, smooth=0), smp_losses.TverskyLoss("multiclass", alpha=0.3, beta=0.7, ignore_index=255)),
        ]
        binary_logits, binary_target = logits[:, :1], (target == 1).long().masked_fill(target == 255, 255)
        pairs_binary = [
            (DiceLoss("binary", smooth=0), smp_losses.DiceLoss("binary", ignore_index=255)),
            (FocalLoss("binary", gamma=2, alpha=0.25), smp_losses.FocalLoss("binary", alpha=0.25, gamma=2, ignore_index=255)),
        ]
        for ours, theirs in pairs_binary:
            assert float(ours(binary_logits, binary_target)) == pytest.approx(float(theirs(binary_logits, binary_target)), rel=1e-5)
    else:
        pairs = []
    pairs.append((LovaszSoftmaxLoss(per_image=per_image), smp_losses.LovaszLoss("multiclass", per_image=per_image, ignore_index=255)))
    for ours, theirs in pairs:
        assert float(ours(logits, target)) == pytest.approx(float(theirs(logits, target)), rel=1e-5), type(ours).__name__
    binary_logits, binary_target = logits[:, :1], (target == 2).long().masked_fill(target == 255, 255)
    hinge = LovaszHingeLoss(per_image=per_image)(binary_logits, binary_target)
    reference = smp_losses.LovaszLoss("binary", per_image=per_image, ignore_index=255)(binary_logits, binary_target)
    assert float(hinge) == pytest.approx(float(reference), rel=1e-5)


# ---------- properties ----------

ALL_MODES = {
    "multiclass": ["ce", "focal", "dice", "jaccard", "tversky", "focal_tversky", "lovasz", "lovasz_softmax"],
    "binary": ["ce", "bce", "focal", "dice", "jaccard", "tversky", "focal_tversky", "lovasz", "lovasz_hinge"],
    "multilabel": ["ce", "bce", "focal", "dice", "jaccard", "tversky", "focal_tversky", "lovasz", "lovasz_hinge"],
}
CASES = [(mode, name) for mode, names in ALL_MODES.items() for name in names]


def _inputs(mode, seed, k=3, n=2, size=5):
    g = torch.Generator().manual_seed(seed)
    if mode == "multiclass":
        target = torch.randint(0, k, (n, size, size), generator=g)
        logits = torch.randn(n, k, size, size, generator=g)
    else:
        channels = 1 if mode == "binary" else k
        target = torch.randint(0, 2, (n, channels, size, size), generator=g)
        logits = torch.randn(n, channels, size, size, generator=g)
    ignored = torch.rand(target.shape, generator=g) < 0.25
    return logits, target.masked_fill(ignored, 255), k if mode != "binary" else 1


@pytest.mark.parametrize("mode,name", CASES)
def test_ignored_pixels_change_nothing_and_get_no_gradient(mode, name):
    logits, target, k = _inputs(mode, seed=len(name))
    loss = build_loss(name, num_classes=k, mode=mode)
    ignored = target == 255
    if mode == "multiclass":
        ignored = ignored.unsqueeze(1).expand_as(logits)
    changed = torch.where(ignored, torch.randn_like(logits) * 10, logits).requires_grad_(True)
    original = logits.clone().requires_grad_(True)
    a, b = loss(original, target), loss(changed, target)
    assert torch.isfinite(a) and float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-5, abs=1e-6)
    b.backward()
    assert torch.all(changed.grad[ignored] == 0)
    assert changed.grad[~ignored].abs().sum() > 0  # the loss does depend on the counted pixels


@pytest.mark.parametrize("mode,name", CASES)
def test_everything_ignored_gives_finite_zero(mode, name):
    logits, target, k = _inputs(mode, seed=3)
    logits.requires_grad_(True)
    value = build_loss(name, num_classes=k, mode=mode)(logits, torch.full_like(target, 255))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    if name in ("ce", "bce", "focal", "lovasz", "lovasz_softmax", "lovasz_hinge"):
        assert float(value.detach()) == 0.0


@FAST
@given(st.sampled_from(CASES), st.integers(0, 10_000))
def test_perfect_prediction_is_near_zero_and_bounds(case, seed):
    mode, name = case
    logits, target, k = _inputs(mode, seed)
    loss = build_loss(name, num_classes=k, mode=mode)
    if mode == "multiclass":
        perfect = F.one_hot(target.masked_fill(target == 255, 0), k).permute(0, 3, 1, 2).float() * 40 - 20
    else:
        perfect = (target.masked_fill(target == 255, 0).float() * 2 - 1) * 20
    assert float(loss(perfect, target)) == pytest.approx(0.0, abs=1e-5)
    value = float(loss(logits, target))
    assert value >= 0
    if name in ("dice", "jaccard", "tversky", "focal_tversky"):
        assert value <= 1


@FAST
@given(st.integers(0, 10_000), st.sampled_from(["dice", "jaccard"]), st.booleans())
def test_per_batch_dice_is_one_minus_soft_metric(seed, name, l2):
    """With smooth 0 the per-batch loss is 1 - the mean soft score of seglab.metrics.SoftOverlap."""
    from seglab.metrics import SoftOverlap

    logits, target = _batch(seed)
    norm = "l2" if l2 else "l1"
    metric = SoftOverlap(3, norm=norm, from_logits=True)
    metric.update(logits, target)
    key = "msoft_dice" if name == "dice" else "msoft_iou"
    loss = build_loss(f"{name}(norm={norm},smooth=0)", num_classes=3)
    assert float(loss(logits, target)) == pytest.approx(1 - metric.compute()[key], rel=1e-5)


# ---------- build_loss ----------

def test_build_loss_grammar_and_weights():
    logits, target = _batch(4)
    combo = build_loss(" 0.5 * ce + 2*dice(norm=l2, per_image=true) ", num_classes=3)
    assert isinstance(combo, WeightedSum)
    expected = 0.5 * CrossEntropyLoss()(logits, target) + 2 * DiceLoss(norm="l2", per_image=True)(logits, target)
    assert float(combo(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    assert isinstance(build_loss("ce", num_classes=3), CrossEntropyLoss)
    assert isinstance(build_loss("lovasz", num_classes=1), LovaszHingeLoss)
    assert isinstance(build_loss("ce", num_classes=1), BCELoss)
    assert build_loss("focal_tversky", num_classes=3).gamma == 0.75
    weighted = build_loss("ce", num_classes=3, class_weights=[1, 2, 3])
    assert torch.equal(weighted.class_weights, torch.tensor([1.0, 2.0, 3.0]))
    assert float(build_loss("1e-1*ce", num_classes=3)(logits, target)) == pytest.approx(0.1 * float(CrossEntropyLoss()(logits, target)))
    assert set(LOSS_NAMES) >= {"ce", "bce", "focal", "dice", "jaccard", "lovasz", "tversky", "focal_tversky"}


@pytest.mark.parametrize(
    "spec,culprit",
    [("cee", "cee"), ("ce+", "''"), ("dice(nrom=l2)", "nrom"), ("x*ce", "x*ce"), ("", "empty"), ("dice(norm=l3)", "l3"),
     ("bce", "multiclass")],
)
def test_build_loss_errors_name_the_culprit(spec, culprit):
    with pytest.raises(ValueError, match=culprit.replace("*", r"\*").replace("(", r"\(")):
        build_loss(spec, num_classes=3)


def test_class_weights_length_is_checked():
    with pytest.raises(ValueError, match="class_weights"):
        build_loss("ce", num_classes=3, class_weights=[1.0, 2.0])


@pytest.mark.parametrize("classes", [3, 20])  # the channel-plane and the pixels x classes kernels
@pytest.mark.parametrize("options", [{}, {"weighted": True}, {"ignore_index": 255, "label_smoothing": 0.1}])
def test_pixel_cross_entropy_reads_channels_last_logits_like_nchw(options, classes):
    from seglab.losses.pixelwise import pixel_cross_entropy

    torch.manual_seed(0)
    if options.pop("weighted", False):
        options = {"weight": torch.rand(classes) + 0.5}
    logits = torch.randn(2, classes, 5, 7)
    target = torch.randint(0, classes, (2, 5, 7))
    target[0, 0, :3] = 255 if "ignore_index" in options else 0
    nchw = logits.clone().requires_grad_()
    channels_last = logits.contiguous(memory_format=torch.channels_last).requires_grad_()
    expected = F.cross_entropy(nchw, target, reduction="none", **options)
    per_pixel = pixel_cross_entropy(channels_last, target, **options)
    assert per_pixel.shape == target.shape
    torch.testing.assert_close(per_pixel, expected)
    expected.sum().backward()
    per_pixel.sum().backward()
    torch.testing.assert_close(channels_last.grad, nchw.grad)


def test_focal_loss_is_the_same_on_channels_last_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6)
    target = torch.randint(0, 4, (2, 6, 6))
    loss = FocalLoss("multiclass", gamma=2.0, class_weights=[1.0, 2.0, 0.5, 1.0])
    torch.testing.assert_close(loss(logits.contiguous(memory_format=torch.channels_last), target), loss(logits, target))


def _overlap_by_one_hot(logits, target, ignore_index, per_image):
    """<Y,P>, |P|_1, |P|_2^2, |Y| per class, computed the plain way (one-hot built)."""
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(target.masked_fill(~valid[:, 0], 0), logits.shape[1]).permute(0, 3, 1, 2) * valid
    dims = (2, 3) if per_image else (0, 2, 3)
    return (probs * onehot).sum(dims), probs.sum(dims), (probs * probs).sum(dims), onehot.sum(dims).float()


@pytest.mark.parametrize("classes", [3, 20])
@pytest.mark.parametrize("per_image", [False, True])
def test_overlap_losses_match_the_one_hot_formulas_in_either_layout(classes, per_image):
    torch.manual_seed(1)
    logits = torch.randn(2, classes, 6, 5)
    target = torch.randint(0, classes, (2, 6, 5))
    target[1, :2] = 255
    intersection, l1, l2, count = _overlap_by_one_hot(logits, target, 255, per_image)
    s = 1.0
    expected = {
        DiceLoss(norm="l1", per_image=per_image): 1 - ((2 * intersection + s) / (l1 + count + s)).mean(),
        DiceLoss(norm="l2", per_image=per_image): 1 - ((2 * intersection + s) / (l2 + count + s)).mean(),
        JaccardLoss(per_image=per_image): 1 - ((intersection + s) / (l1 + count - intersection + s)).mean(),
        TverskyLoss(alpha=0.3, beta=0.7, per_image=per_image):
            1 - ((intersection + s) / (intersection + 0.3 * (l1 - intersection) + 0.7 * (count - intersection) + s)).mean(),
    }
    for layout in (torch.contiguous_format, torch.channels_last):
        for loss, value in expected.items():
            torch.testing.assert_close(loss(logits.contiguous(memory_format=layout), target), value)
