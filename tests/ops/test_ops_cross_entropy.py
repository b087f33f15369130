"""Cross-entropy's loss and gradient in one native pass (seglab.ops.cross_entropy), against
F.cross_entropy in float64: values, gradients, weights, ignored pixels, bad targets, and which
calls take the native route."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seglab.losses import (CrossEntropyLoss, DiceLoss, LovaszSoftmaxLoss, WeightedSum, float32_logits_for,
                           upcasts_itself)
from seglab.ops import native
from seglab.ops.cross_entropy import native_cross_entropy, takes_native_cross_entropy

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"the native kernels are not available: {native.unavailable_reason()}")

IGNORE = 255


def _problem(pixels: int, classes: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = (6 * torch.randn(pixels, classes, generator=generator)).to(dtype)
    target = torch.randint(0, classes, (pixels,), generator=generator)
    target[::7] = IGNORE
    return logits, target


def _reference(logits: torch.Tensor, target: torch.Tensor,
               weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.double().requires_grad_()
    loss = F.cross_entropy(x, target, weight=None if weight is None else weight.double(), ignore_index=IGNORE)
    loss.backward()
    return loss.detach(), x.grad


# Pixels: under one block of 16, blocks with a remainder, and more than one chunk of 4096 (the
# first pixel is ignored: with 2 pixels one counts).
@pytest.mark.parametrize("pixels", [2, 15, 33, 9001])
@pytest.mark.parametrize("classes", [1, 3, 21, 79, 80, 150])  # (pixel by pixel from 80)
@pytest.mark.parametrize("weighted", [False, True])
def test_float32_loss_and_gradient_equal_pytorchs(pixels, classes, weighted):
    logits, target = _problem(pixels, classes, torch.float32)
    weight = torch.rand(classes, generator=torch.Generator().manual_seed(1)) + 0.1 if weighted else None
    loss, gradient = native.cross_entropy(logits, target, weight, IGNORE)
    expected_loss, expected_gradient = _reference(logits, target, weight)
    assert loss.dtype == torch.float32 and gradient.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected_loss, rtol=2e-6, atol=1e-6)
    # softmax - 1 at a pixel's true class cancels in float32, in PyTorch's float32 path as well:
    # a few float32 roundings of each entry, within 4x PyTorch's own largest error, plus
    # float32's spacing at 1 scaled as the entries (w / W).
    x = logits.clone().requires_grad_()
    F.cross_entropy(x, target, weight=weight, ignore_index=IGNORE).backward()
    pytorch_error = float((x.grad.double() - expected_gradient).abs().max())
    counted = target != IGNORE
    total_weight = float(counted.sum()) if weight is None else float(weight[target[counted]].sum())
    largest_weight = 1.0 if weight is None else float(weight.max())
    bound = 2e-6 * expected_gradient.abs() + 4 * pytorch_error + 1.2e-7 * largest_weight / total_weight
    assert ((gradient.double() - expected_gradient).abs() <= bound).all()


@pytest.mark.parametrize("classes", [2, 21, 1024])
def test_bf16_logits_give_the_float32_results_rounded_to_bf16(classes):
    logits, target = _problem(2000, classes, torch.bfloat16)
    loss, gradient = native.cross_entropy(logits, target, None, IGNORE)
    expected_loss, _ = _reference(logits, target, None)  # of the same bf16 values
    assert gradient.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), expected_loss, rtol=2e-6, atol=1e-6)
    # PyTorch's float32 gradient (softmax - one-hot cancels the same way) rounded to bf16: the
    # two float32 values differ in their last bits, so a rounding may go the other way (1 ulp).
    x = logits.float().requires_grad_()
    F.cross_entropy(x, target, ignore_index=IGNORE).backward()
    assert ((gradient.float() - x.grad).abs() <= x.grad.abs() * 2.0**-7 + 1e-10).all()


def test_every_pixel_ignored_gives_zero_loss_and_gradient():
    logits = torch.randn(40, 5)
    loss, gradient = native.cross_entropy(logits, torch.full((40,), IGNORE), None, IGNORE)
    assert float(loss) == 0.0 and not gradient.any()


def test_a_target_outside_the_classes_gets_one_clear_error():
    logits, target = _problem(100, 4, torch.float32)
    target[50] = 4
    with pytest.raises(ValueError, match=r"target class outside 0\.\.3 \(and not ignore_index=255\)"):
        native.cross_entropy(logits, target, None, IGNORE)
    target[50] = -1
    with pytest.raises(ValueError, match="target class outside"):
        native.cross_entropy(logits, target, None, IGNORE)


def test_the_loss_does_not_depend_on_the_threads():
    logits, target = _problem(50_000, 21, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.cross_entropy(logits, target, None, IGNORE)
        torch.set_num_threads(max(2, threads))
        several = native.cross_entropy(logits, target, None, IGNORE)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], several[0]) and torch.equal(one[1], several[1])


def _channels_last_map(dtype: torch.dtype = torch.bfloat16, classes: int = 21) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(2, classes, 9, 11, generator=generator)).to(dtype)
    target = torch.randint(0, classes, (2, 9, 11), generator=generator)
    target[:, :2] = IGNORE
    return logits.contiguous(memory_format=torch.channels_last).requires_grad_(), target


def test_the_loss_module_takes_the_native_route_for_channels_last_maps(monkeypatch):
    logits, target = _channels_last_map()
    calls = []
    original = native.cross_entropy
    monkeypatch.setattr(native, "cross_entropy", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    loss = CrossEntropyLoss(ignore_index=IGNORE)(logits, target)
    loss.backward()
    assert calls and loss.dtype == torch.float32
    x = logits.detach().double().requires_grad_()
    expected = F.cross_entropy(x, target, ignore_index=IGNORE)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=1e-6)
    # The gradient in the logits' dtype and layout.
    assert logits.grad.dtype == torch.bfloat16 and logits.grad.stride() == logits.stride()
    torch.testing.assert_close(logits.grad.double(), x.grad, rtol=2**-7, atol=1e-6)


def test_class_weights_and_a_scaled_loss_reach_the_gradient():
    logits, target = _channels_last_map(torch.float32, classes=4)
    weights = [0.5, 2.0, 1.0, 3.0]
    (0.25 * CrossEntropyLoss(class_weights=weights, ignore_index=IGNORE)(logits, target)).backward()
    x = logits.detach().double().requires_grad_()
    weight = torch.tensor(weights, dtype=torch.float64)
    (0.25 * F.cross_entropy(x, target, weight=weight, ignore_index=IGNORE)).backward()
    torch.testing.assert_close(logits.grad.double(), x.grad, rtol=1e-5, atol=1e-9)


def test_a_scaled_bf16_loss_scales_its_gradient_in_float32():
    logits, target = _channels_last_map()
    (0.4 * CrossEntropyLoss(ignore_index=IGNORE)(logits, target)).backward()
    _, unscaled = native.cross_entropy(logits.detach().permute(0, 2, 3, 1).reshape(-1, 21), target.reshape(-1),
                                       None, IGNORE)
    # 0.4 times the float32 values, one rounding: not 0.4 first rounded to bf16 (0.40039...).
    expected = (unscaled.float() * 0.4).to(torch.bfloat16)
    assert torch.equal(logits.grad.permute(0, 2, 3, 1).reshape(-1, 21), expected)


def test_the_gradient_is_handed_on_once():
    logits, target = _channels_last_map(torch.float32)
    loss = CrossEntropyLoss()(logits, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="compute the loss again"):
        loss.backward()


def test_without_gradients_only_the_loss_is_computed(monkeypatch):
    logits, target = _channels_last_map(torch.float32)
    asked = []
    original = native.cross_entropy

    def recording(*args, gradient=True, **kwargs):
        asked.append(gradient)
        return original(*args, gradient=gradient, **kwargs)

    monkeypatch.setattr(native, "cross_entropy", recording)
    with torch.no_grad():
        loss = native_cross_entropy(logits, target, None, IGNORE)
    assert asked == [False] and not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach(), target, ignore_index=IGNORE))


def test_which_calls_take_the_native_route():
    logits, target = _channels_last_map(torch.float32)
    assert takes_native_cross_entropy(logits, target)
    assert takes_native_cross_entropy(logits.detach().permute(0, 2, 3, 1).reshape(-1, 21), target.reshape(-1))
    assert not takes_native_cross_entropy(logits.contiguous(), target)  # NCHW: the classes are strided
    assert not takes_native_cross_entropy(logits, target, label_smoothing=0.1)
    assert not takes_native_cross_entropy(logits.double(), target)
    assert not takes_native_cross_entropy(logits, target.transpose(1, 2))  # a target of another shape
    assert not takes_native_cross_entropy(logits, target.float())
    many = torch.zeros(1, native.MAX_CLASSES + 1, 2, 2).contiguous(memory_format=torch.channels_last)
    assert not takes_native_cross_entropy(many, torch.zeros(1, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("layout", ["nchw", "smoothing"])
def test_the_other_calls_compute_the_same_in_float32(layout):
    logits, target = _channels_last_map()
    smoothing = 0.1 if layout == "smoothing" else 0.0
    logits = logits.detach().contiguous() if layout == "nchw" else logits.detach()
    loss = CrossEntropyLoss(ignore_index=IGNORE, label_smoothing=smoothing)(logits, target)
    expected = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, label_smoothing=smoothing)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


def test_which_losses_upcast_the_logits_themselves():
    ce, dice, lovasz = CrossEntropyLoss(), DiceLoss(), LovaszSoftmaxLoss()
    assert upcasts_itself(ce) and upcasts_itself(dice) and not upcasts_itself(lovasz)
    assert upcasts_itself(WeightedSum([(0.5, ce)]))
    # Several upcasting terms: the sum makes one float32 copy for them all where they do not
    # share a pass (tests/ops/test_ops_overlap_sums.py); with a term that does not, the caller does.
    assert upcasts_itself(WeightedSum([(1.0, ce), (0.5, CrossEntropyLoss())]))
    assert upcasts_itself(WeightedSum([(1.0, ce), (1.0, dice)]))
    assert not upcasts_itself(WeightedSum([(1.0, ce), (1.0, lovasz)]))
    logits = torch.zeros(1, 2, 2, 2, dtype=torch.bfloat16)
    assert float32_logits_for(ce, logits) is logits and float32_logits_for(lovasz, logits).dtype == torch.float32
