"""The overlap losses' sums and their gradient in one native pass each way
(seglab.ops.overlap_sums), against PyTorch's operators in float64: sums, gradients, ignored
pixels, per image, threads, bad targets, and which calls take the native route; then the same
passes with cross-entropy, and the sums of losses (`WeightedSum`) that share them."""
from __future__ import annotations

import pytest
import torch

import seglab.losses.factory as factory
from seglab.losses import CrossEntropyLoss, DiceLoss, JaccardLoss, TverskyLoss, WeightedSum, build_loss, upcasts_itself
from seglab.losses._inputs import multiclass_overlap_sums
from seglab.ops import native
from seglab.ops.overlap_sums import native_cross_entropy_overlap_sums, native_overlap_sums, takes_native_overlap_sums

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"the native kernels are not available: {native.unavailable_reason()}")

IGNORE = 255


def _problem(n: int, classes: int, height: int, width: int, dtype: torch.dtype,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels-last logits (the native route's layout) and a target with every seventh pixel ignored."""
    generator = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(n, classes, height, width, generator=generator)).to(dtype)
    target = torch.randint(0, classes, (n, height, width), generator=generator)
    target.view(-1)[::7] = IGNORE
    return logits.contiguous(memory_format=torch.channels_last), target


def _float64_sums(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None, squared: bool):
    """PyTorch's operators (float64 logits never take the native route) on the same values."""
    x = logits.double().requires_grad_()
    assert not takes_native_overlap_sums(x, target)
    return x, multiclass_overlap_sums(x, target, ignore_index, "l2" if squared else "l1", True)


# Images under one block of 16 pixels, with a remainder, and over one chunk of 4096 (70 x 70);
# classes in blocks of pixels up to 79, a pixel's classes in vectors from 80 on (ADE20K's 150).
@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 9, 7), (2, 70, 70)])
@pytest.mark.parametrize("classes", [1, 6, 21, 79, 80, 150])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sums_and_gradient_equal_pytorchs_operators_in_float64(shape, classes, squared, dtype):
    n, height, width = shape
    logits, target = _problem(n, classes, height, width, dtype)
    x, expected = _float64_sums(logits, target, IGNORE, squared)
    sums = native_overlap_sums(logits.requires_grad_(), target, IGNORE, squared)
    for got, want in zip(sums, expected):
        assert got.dtype == torch.float32 and got.shape == (n, classes)
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-4)
    generator = torch.Generator().manual_seed(1)
    grad_i, grad_p = torch.randn(n, classes, generator=generator), torch.randn(n, classes, generator=generator)
    ((sums[0] * grad_i).sum() + (sums[1] * grad_p).sum()).backward()
    want_grad, = torch.autograd.grad((expected[0] * grad_i).sum() + (expected[1] * grad_p).sum(), x)
    assert logits.grad.dtype == dtype and logits.grad.is_contiguous(memory_format=torch.channels_last)
    # float32 arithmetic (p (dp - sum p dp) cancels: an absolute bound), in bf16 each value rounded once
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), want_grad, **tolerance)


def test_ignored_pixels_count_nowhere_and_get_no_gradient_and_none_ignored_without_an_index():
    logits, target = _problem(2, 5, 9, 9, torch.float32)
    logits.requires_grad_()
    intersection, predicted, actual = native_overlap_sums(logits, target, IGNORE, False)
    counted = target != IGNORE
    assert torch.equal(actual.sum(1), counted.sum((1, 2)).float())
    (intersection.sum() + predicted.sum()).backward()
    assert torch.all(logits.grad.movedim(1, -1)[~counted] == 0)
    assert torch.any(logits.grad.movedim(1, -1)[counted] != 0)
    # Without an ignore_index every pixel counts, and 255 is then a bad target.
    everything = target.clamp(max=4)
    assert native_overlap_sums(logits.detach(), everything, None, False)[2].sum() == everything.numel()
    with pytest.raises(ValueError, match=r"target class outside 0\.\.4$"):
        native_overlap_sums(logits.detach(), target, None, False)


def test_bad_targets_are_refused_as_pytorchs_route_refuses_them():
    logits, target = _problem(1, 4, 6, 6, torch.float32)
    target[0, 2, 3] = 7
    message = r"target class outside 0\.\.3 \(and not ignore_index=255\)"
    with pytest.raises(ValueError, match=message):
        native_overlap_sums(logits, target, IGNORE, False)
    with pytest.raises(ValueError, match=message):
        multiclass_overlap_sums(logits.double(), target, IGNORE, "l1", False)


def _same_bits_on_one_thread_and_on_three(compute) -> None:
    """`compute()` (a tuple of tensors) gives the same bits at 1 and 3 threads."""
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(compute())
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


def test_the_same_bits_on_one_thread_and_on_three():
    logits, target = _problem(2, 21, 70, 70, torch.float32)

    def sums_and_gradient():
        x = logits.clone().requires_grad_()
        sums = native_overlap_sums(x, target, IGNORE, False)
        (sums[0].sum() - sums[1].square().sum()).backward()
        return (*sums, x.grad)

    _same_bits_on_one_thread_and_on_three(sums_and_gradient)


def test_the_native_functions_refuse_what_they_cannot_take_in_one_line():
    logits = torch.zeros(2, 9, 4)
    target = torch.zeros(2, 9, dtype=torch.int64)
    with pytest.raises(ValueError, match="overlap_sums takes N x S x K logits and an N x S target"):
        native.overlap_sums(logits, target[:1])
    too_many = native.OVERLAP_MAX_CLASSES + 1
    with pytest.raises(ValueError, match=f"overlap_sums takes 1 to {native.OVERLAP_MAX_CLASSES} classes, not {too_many}"):
        native.overlap_sums(torch.zeros(2, 9, too_many), target)
    with pytest.raises(ValueError, match="the target must be a contiguous int64"):
        native.overlap_sums(logits, target.int())
    with pytest.raises(ValueError, match="overlap_sums_backward takes 2 x 4 gradients of the sums, not"):
        native.overlap_sums_backward(logits, target, torch.zeros(2, 3), torch.zeros(2, 4))


def test_which_calls_take_the_native_route():
    logits, target = _problem(2, 6, 8, 8, torch.float32)
    assert takes_native_overlap_sums(logits, target)
    assert takes_native_overlap_sums(logits.bfloat16(), target.to(torch.uint8))
    assert not takes_native_overlap_sums(logits.contiguous(), target)  # NCHW: classes not contiguous per pixel
    assert not takes_native_overlap_sums(logits.double(), target)
    assert not takes_native_overlap_sums(logits, target.float())
    assert not takes_native_overlap_sums(logits, target[:, :4])
    assert takes_native_overlap_sums(*_problem(1, 150, 4, 4, torch.float32))  # ADE20K's classes
    many, many_target = _problem(1, native.OVERLAP_MAX_CLASSES + 1, 4, 4, torch.float32)
    assert not takes_native_overlap_sums(many, many_target)


def _loss_and_gradient(loss: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor, function: str,
                       monkeypatch) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The calls of `native.<function>` that computing the loss and its gradient made, the loss
    and the gradient."""
    calls: list[int] = []
    original = getattr(native, function)
    monkeypatch.setattr(native, function, lambda *a, **k: calls.append(1) or original(*a, **k))
    x = logits.clone().requires_grad_()
    value = loss(x, target)
    value.backward()
    return calls, value, x.grad


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("loss", [DiceLoss(), DiceLoss(norm="l2"), JaccardLoss(), TverskyLoss(gamma=0.75)],
                         ids=["dice", "dice-l2", "jaccard", "focal-tversky"])
def test_the_losses_on_the_native_route_equal_pytorchs_operators(loss, per_image, monkeypatch):
    loss.per_image = per_image
    logits, target = _problem(2, 21, 20, 24, torch.bfloat16)
    calls, value, grad = _loss_and_gradient(loss, logits, target, "overlap_sums", monkeypatch)
    assert calls and value.dtype == torch.float32
    reference = logits.double().requires_grad_()  # (float64: PyTorch's operators)
    expected = loss(reference, target)
    expected.backward()
    assert len(calls) == 1
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), reference.grad, rtol=2 ** -8, atol=1e-7)


def test_the_overlap_losses_upcast_bf16_logits_themselves_on_either_route():
    """A lone Dice loss gets bf16 logits as they are; so does `ce+dice` (`WeightedSum`: the shared
    pass, or one float32 copy for both terms)."""
    assert upcasts_itself(build_loss("dice", num_classes=6)) and upcasts_itself(DiceLoss(mode="binary"))
    assert upcasts_itself(build_loss("ce+dice", num_classes=6))
    logits, target = _problem(2, 6, 8, 8, torch.bfloat16)
    nchw = logits.contiguous()  # PyTorch's operators, on the logits cast to float32 first
    on_native, on_operators = DiceLoss()(logits, target), DiceLoss()(nchw, target)
    assert on_native.dtype == on_operators.dtype == torch.float32
    torch.testing.assert_close(on_native, on_operators)


# Cross-entropy in the same passes (`native_cross_entropy_overlap_sums`, `WeightedSum`'s shared pass).

def _float64_cross_entropy(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                           ignore_index: int | None) -> torch.Tensor:
    """F.cross_entropy in float64, 0 where every pixel is ignored (seglab's convention)."""
    ignore = -100 if ignore_index is None else ignore_index
    if bool((target == ignore).all()):
        return x.sum() * 0
    return torch.nn.functional.cross_entropy(x, target, None if weight is None else weight.double(),
                                             ignore_index=ignore)


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 70, 70)])
@pytest.mark.parametrize("classes", [1, 6, 21, 150])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_with_the_sums_equals_pytorchs_operators_in_float64(shape, classes, weighted, dtype):
    n, height, width = shape
    logits, target = _problem(n, classes, height, width, dtype, seed=2)
    weight = torch.rand(classes, generator=torch.Generator().manual_seed(3)) + 0.5 if weighted else None
    x, expected_sums = _float64_sums(logits, target, IGNORE, False)
    expected_loss = _float64_cross_entropy(x, target, weight, IGNORE)
    loss, *sums = native_cross_entropy_overlap_sums(logits.requires_grad_(), target, weight, IGNORE, False)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), expected_loss.detach(), rtol=1e-5, atol=1e-6)
    # The sums are the overlap pass's own, bit for bit.
    for got, alone in zip(sums, native_overlap_sums(logits.detach(), target, IGNORE, False)):
        assert torch.equal(got, alone)
    generator = torch.Generator().manual_seed(1)
    grad_i, grad_p = torch.randn(n, classes, generator=generator), torch.randn(n, classes, generator=generator)
    (0.7 * loss + (sums[0] * grad_i).sum() + (sums[1] * grad_p).sum()).backward()
    want, = torch.autograd.grad(0.7 * expected_loss + (expected_sums[0] * grad_i).sum()
                                + (expected_sums[1] * grad_p).sum(), x)
    assert logits.grad.dtype == dtype and logits.grad.is_contiguous(memory_format=torch.channels_last)
    # Both gradients added in float32 and rounded once to the logits' dtype.
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), want, **tolerance)


def test_cross_entropy_alone_of_the_shared_pass_and_every_pixel_ignored():
    logits, target = _problem(2, 6, 9, 9, torch.float32)
    x = logits.clone().requires_grad_()
    loss, *_ = native_cross_entropy_overlap_sums(x, target, None, IGNORE, True)
    loss.backward()  # the sums' gradients are None: cross-entropy's alone
    reference = logits.double().requires_grad_()
    _float64_cross_entropy(reference, target, None, IGNORE).backward()
    torch.testing.assert_close(x.grad.double(), reference.grad, rtol=1e-5, atol=1e-7)
    x.grad = None
    loss, *sums = native_cross_entropy_overlap_sums(x, torch.full_like(target, IGNORE), None, IGNORE, False)
    assert loss.item() == 0.0 and all(term.abs().sum() == 0 for term in sums)
    (loss + sums[1].sum()).backward()
    assert torch.all(x.grad == 0)


def test_the_shared_pass_gives_the_same_bits_on_one_thread_and_on_three():
    logits, target = _problem(2, 21, 70, 70, torch.bfloat16)

    def losses_and_gradient():
        x = logits.clone().requires_grad_()
        loss, *sums = native_cross_entropy_overlap_sums(x, target, None, IGNORE, False)
        (loss + sums[0].sum() - sums[1].square().sum()).backward()
        return (loss, *sums, x.grad)

    _same_bits_on_one_thread_and_on_three(losses_and_gradient)


def test_the_shared_pass_refuses_class_weights_of_another_length_in_one_line():
    with pytest.raises(ValueError, match=r"cross_entropy_overlap_sums takes one class weight per class \(4\), not "
                                         r"shape \(3,\)$"):
        native.cross_entropy_overlap_sums(torch.zeros(2, 9, 4), torch.zeros(2, 9, dtype=torch.int64), torch.ones(3))


def _apart(loss: WeightedSum, logits: torch.Tensor, target: torch.Tensor, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(factory.WeightedSum, "_shared_pass_pair", lambda *args: None)
        return loss(logits, target)


@pytest.mark.parametrize("spec", ["ce+dice", "dice+0.5*ce", "2*ce+jaccard(per_image=true)", "ce+dice(norm=l2)",
                                  "ce+focal_tversky"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("classes", [6, 150])
def test_a_sum_of_cross_entropy_and_an_overlap_loss_shares_the_pass(spec, dtype, classes, monkeypatch):
    logits, target = _problem(2, classes, 20, 24, dtype, seed=4)
    loss = build_loss(spec, num_classes=classes, class_weights=[0.5 + 0.25 * (c % 5) for c in range(classes)])
    calls, value, grad = _loss_and_gradient(loss, logits, target, "cross_entropy_overlap_sums", monkeypatch)
    assert len(calls) == 1 and value.dtype == torch.float32 and grad.dtype == dtype
    reference = logits.double().requires_grad_()  # each term apart, on PyTorch's operators in float64
    expected = _apart(loss, reference, target, monkeypatch)
    expected.backward()
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-7)
    torch.testing.assert_close(grad.double(), reference.grad, **tolerance)


def test_which_sums_of_losses_share_the_pass():
    logits, target = _problem(2, 6, 8, 8, torch.float32)

    def shares(loss: torch.nn.Module, x: torch.Tensor = logits) -> bool:
        return isinstance(loss, WeightedSum) and loss._shared_pass_pair(x, target) is not None

    assert shares(build_loss("ce+dice", num_classes=6)) and shares(build_loss("tversky+ce", num_classes=6))
    assert not shares(build_loss("ce+dice", num_classes=6), logits.contiguous())  # NCHW: no native route
    assert not shares(build_loss("ce+dice+jaccard", num_classes=6))  # three terms: each apart
    assert not shares(build_loss("ce+lovasz", num_classes=6)) and not shares(build_loss("focal+dice", num_classes=6))
    assert not shares(build_loss("ce(label_smoothing=0.1)+dice", num_classes=6))
    assert not shares(WeightedSum([(1.0, CrossEntropyLoss(ignore_index=None)), (1.0, DiceLoss())]))
    assert not shares(build_loss("ce+dice", num_classes=6, mode="multilabel"))  # "ce" is BCE there
    assert not shares(WeightedSum([(1.0, CrossEntropyLoss()), (1.0, DiceLoss(mode="binary"))]))


def test_a_sum_apart_computes_from_one_float32_copy_of_bf16_logits(monkeypatch):
    """Where the terms do not share the pass, `WeightedSum` copies bf16 logits to float32 once,
    so that the gradients are added before any rounding to bf16."""
    logits, target = _problem(2, 6, 10, 10, torch.bfloat16)
    loss = build_loss("ce+dice", num_classes=6)
    seen = []
    for term in loss.losses:
        term.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = logits.clone().requires_grad_()
    _apart(loss, x, target, monkeypatch).backward()
    assert seen == [torch.float32, torch.float32] and x.grad.dtype == torch.bfloat16
    reference = logits.double().requires_grad_()
    _apart(loss, reference, target, monkeypatch).backward()
    torch.testing.assert_close(x.grad.double(), reference.grad, rtol=2 ** -8, atol=1e-7)
