"""Weighted combinations of losses and `build_loss`, the factory the trainer and CLI call.

Spec grammar (whitespace ignored):

    spec   := term ("+" term)*
    term   := [weight "*"] name [ "(" option ("," option)* ")" ]
    option := key "=" value          value: number, true/false, none, or a bare word

Names: ce, bce, focal, dice, jaccard, tversky, focal_tversky, lovasz (softmax for multiclass,
hinge for binary/multilabel), lovasz_softmax, lovasz_hinge. Examples: "ce", "ce+dice",
"0.5*ce+1.0*lovasz", "focal(gamma=3)", "ce+dice(norm=l2,per_image=true)", "tversky(alpha=0.5)".
In the binary and multilabel modes "ce" means BCE on logits.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from seglab.losses._inputs import check_mode
from seglab.losses.lovasz import LovaszHingeLoss, LovaszSoftmaxLoss
from seglab.losses.overlap import DiceLoss, JaccardLoss, TverskyLoss, _OverlapLoss
from seglab.losses.pixelwise import BCELoss, CrossEntropyLoss, FocalLoss
from seglab.ops.overlap_sums import native_cross_entropy_overlap_sums, takes_native_overlap_sums

__all__ = ["LOSS_NAMES", "WeightedSum", "build_loss", "float32_logits_for", "upcasts_itself"]


class WeightedSum(nn.Module):
    """sum_i w_i L_i(logits, target), e.g. CE + Dice.

    Cross-entropy and one multiclass overlap loss (`ce+dice`, `ce+jaccard`, `ce+tversky`, the
    trainer's default `ce+dice`) share their passes over CPU logits where both would take
    native kernels (`seglab.ops.overlap_sums.native_cross_entropy_overlap_sums`): one pass
    forward, one back, one gradient written. Each loss's value and gradient are the same as
    apart, up to float32 rounding."""

    def __init__(self, terms: Sequence[tuple[float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a weighted sum of losses needs at least one term")
        self.weights = [float(w) for w, _ in terms]
        self.losses = nn.ModuleList([loss for _, loss in terms])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pair = self._shared_pass_pair(logits, target)
        if pair is not None:
            return self._shared_pass(logits, target, *pair)
        if len(self.losses) > 1 and logits.dtype in (torch.bfloat16, torch.float16) and self.upcasts_itself:
            logits = logits.float()  # one float32 copy for every term (see `upcasts_itself`)
        return sum(w * loss(logits, target) for w, loss in zip(self.weights, self.losses))

    def _shared_pass_pair(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int] | None:
        """(index of the cross-entropy, index of the overlap loss) where the two terms share one
        native pass over these logits, else None."""
        if len(self.losses) != 2:
            return None
        kinds = [isinstance(loss, CrossEntropyLoss) for loss in self.losses]
        if kinds.count(True) != 1:
            return None
        ce_index = kinds.index(True)
        ce, overlap = self.losses[ce_index], self.losses[1 - ce_index]
        shares = (isinstance(overlap, _OverlapLoss) and overlap.mode == "multiclass"
                  and ce.label_smoothing == 0.0 and ce.ignore_index == overlap.ignore_index
                  and takes_native_overlap_sums(logits, target))  # (which checks the target's shape too)
        return (ce_index, 1 - ce_index) if shares else None

    def _shared_pass(self, logits: torch.Tensor, target: torch.Tensor, ce_index: int, overlap_index: int) -> torch.Tensor:
        ce, overlap = self.losses[ce_index], self.losses[overlap_index]
        cross_entropy, *sums = native_cross_entropy_overlap_sums(logits, target, ce.class_weights, ce.ignore_index,
                                                                 overlap.sums_norm == "l2")
        if not overlap.per_image:
            sums = [term.sum(0) for term in sums]
        return self.weights[ce_index] * cross_entropy + self.weights[overlap_index] * overlap.loss_from_sums(*sums)

    @property
    def upcasts_itself(self) -> bool:
        # Every term computes in float32 from half-precision logits; with several terms, the sum
        # makes one float32 copy for them all where they do not share a native pass: handed bf16
        # logits, each term would round its own gradient to bf16 before the sum. `ce+dice`'s
        # gradient on bf16 logits (16 x 6 x 64 x 64) came within 1.52e-3 of float64's so, against
        # 1.09e-3 (bf16's rounding of the exact gradient) from a float32 copy. The shared pass
        # sums the two gradients in float32 and rounds once.
        return all(upcasts_itself(loss) for loss in self.losses)

    def extra_repr(self) -> str:
        return "weights=" + ", ".join(f"{w:g}" for w in self.weights)


def upcasts_itself(loss_fn: Any) -> bool:
    """Whether `loss_fn` computes in float32 from logits of any dtype (so a caller need not
    copy bf16 logits to float32 first)."""
    return bool(getattr(loss_fn, "upcasts_itself", False))


def float32_logits_for(loss_fn: Any, logits: torch.Tensor) -> torch.Tensor:
    """`logits` as `loss_fn` should get them to compute in float32: as they are where it
    upcasts them itself, else as float32."""
    return logits if upcasts_itself(loss_fn) else logits.float()


def _ce(mode: str, ignore_index: int | None, class_weights: list[float] | None, **options: Any) -> nn.Module:
    if mode == "multiclass":
        return CrossEntropyLoss(class_weights=class_weights, ignore_index=ignore_index, **options)
    return BCELoss(mode=mode, ignore_index=ignore_index, **options)


def _lovasz(mode: str, ignore_index: int | None, class_weights: list[float] | None, **options: Any) -> nn.Module:
    if mode == "multiclass":
        return LovaszSoftmaxLoss(ignore_index=ignore_index, **options)
    return LovaszHingeLoss(mode=mode, ignore_index=ignore_index, **options)


def _with_mode(loss_class: type[nn.Module], uses_class_weights: bool = False, **defaults: Any) -> Callable[..., nn.Module]:
    def build(mode: str, ignore_index: int | None, class_weights: list[float] | None, **options: Any) -> nn.Module:
        if uses_class_weights and mode == "multiclass":
            options.setdefault("class_weights", class_weights)
        return loss_class(mode=mode, ignore_index=ignore_index, **{**defaults, **options})

    return build


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "ce": _ce,
    "bce": lambda mode, ignore_index, class_weights, **o: BCELoss(mode=mode, ignore_index=ignore_index, **o),
    "focal": _with_mode(FocalLoss, uses_class_weights=True),
    "dice": _with_mode(DiceLoss),
    "jaccard": _with_mode(JaccardLoss),
    "tversky": _with_mode(TverskyLoss),
    "focal_tversky": _with_mode(TverskyLoss, gamma=0.75),
    "lovasz": _lovasz,
    "lovasz_softmax": lambda mode, ignore_index, class_weights, **o: LovaszSoftmaxLoss(ignore_index=ignore_index, **o),
    "lovasz_hinge": lambda mode, ignore_index, class_weights, **o: LovaszHingeLoss(mode=mode, ignore_index=ignore_index, **o),
}
LOSS_NAMES = tuple(_BUILDERS)

_TERM = re.compile(r"^(?:(?P<weight>[0-9.eE+-]+)\*)?(?P<name>[a-z_]+)(?:\((?P<options>[^()]*)\))?$")


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _split_terms(spec: str) -> list[str]:
    """Split on '+' that are not part of a number's exponent or inside parentheses."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += (char == "(") - (char == ")")
        if char == "+" and depth == 0 and not (i > 0 and spec[i - 1] in "eE" and i > 1 and spec[i - 2].isdigit()):
            terms.append(spec[start:i])
            start = i + 1
    terms.append(spec[start:])
    return terms


def _parse(spec: str) -> list[tuple[float, str, dict[str, Any]]]:
    compact = re.sub(r"\s+", "", spec).lower()
    if not compact:
        raise ValueError("loss spec is empty; use e.g. 'ce' or 'ce+dice'")
    parsed = []
    for term in _split_terms(compact):
        match = _TERM.match(term)
        if match is None:
            raise ValueError(f"cannot parse loss term {term!r} in spec {spec!r}; expected [weight*]name[(key=value,...)]")
        name = match["name"]
        if name not in _BUILDERS:
            raise ValueError(f"unknown loss {name!r} in spec {spec!r}; choose from {', '.join(LOSS_NAMES)}")
        try:
            weight = float(match["weight"]) if match["weight"] else 1.0
        except ValueError:
            raise ValueError(f"loss weight {match['weight']!r} in spec {spec!r} is not a number") from None
        options = {}
        for item in filter(None, (match["options"] or "").split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"loss option {item!r} of {name!r} must be written key=value")
            options[key] = _value(value)
        parsed.append((weight, name, options))
    return parsed


def build_loss(
    spec: str,
    *,
    num_classes: int,
    ignore_index: int | None = 255,
    class_weights: Sequence[float] | None = None,
    mode: str | None = None,
) -> nn.Module:
    """Build the loss described by `spec` (grammar in the module docstring).

    mode defaults to "multiclass" when num_classes > 1 and "binary" when num_classes == 1.
    class_weights (one per class) weigh the CE and focal terms of the multiclass mode. The
    module is called as loss(logits N x K x H x W, target N x H x W long) for multiclass.
    Unknown names or options raise ValueError naming them.
    """
    mode = check_mode(mode or ("multiclass" if num_classes > 1 else "binary"))
    if class_weights is not None:
        class_weights = [float(w) for w in class_weights]
        if len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} entries for num_classes={num_classes}")
    terms = []
    for weight, name, options in _parse(spec):
        try:
            loss = _BUILDERS[name](mode, ignore_index, class_weights, **options)
        except TypeError as error:
            raise ValueError(f"loss {name!r} does not accept the options {sorted(options)} ({error})") from None
        terms.append((weight, loss))
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return WeightedSum(terms)
