"""Tensors derived from a module's weights, built once and kept until a weight changes.

Several fast paths run a kernel derived from the parameters rather than the parameters
themselves: oneDNN's blocked (packed) layout of a convolution weight, the transposed kernel of a
3x3 convolution over a nearest-upsampled map, a 3x3 kernel composed with the 1x1 lateral before
it. Building one costs a pass over the weights at every call; in inference the weights do not
change, so it is built once. A weight "changes" when its storage, in-place version counter
(bumped by optimizer steps and `load_state_dict`), dtype or device does, so a kept tensor is
never stale.

Copies and pickles of the module get an empty keeper and rebuild at their first call: what is
kept is derived, and a oneDNN opaque tensor cannot be copied at all.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch

from seglab.ops.grad_mode import records_gradients

__all__ = ["KeptFromWeights"]

Kept = TypeVar("Kept")


class KeptFromWeights(Generic[Kept]):
    """Holds one value built from some weights; `get` rebuilds it when any of them changed."""

    def __init__(self) -> None:
        self.value: Kept | None = None
        self._built_for: tuple | None = None

    def get(self, weights: Sequence[torch.Tensor], build: Callable[[], Kept], *settings: Hashable) -> Kept:
        """The kept value, or `build()` (then kept) when `weights` or `settings` differ from the
        last build's."""
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights) + settings
        if self._built_for != key:
            self.value, self._built_for = build(), key
        return self.value  # type: ignore[return-value]

    def get_unless_training(self, weights: Sequence[torch.Tensor], build: Callable[[], Kept],
                            *settings: Hashable) -> Kept:
        """`build()` afresh while gradients are recorded through any of `weights` (training:
        the value must be differentiable and current), else `get`."""
        if records_gradients(*weights):
            return build()
        return self.get(weights, build, *settings)

    def clear(self) -> None:
        self.value, self._built_for = None, None

    def __deepcopy__(self, memo: dict) -> KeptFromWeights[Kept]:
        return KeptFromWeights()

    def __reduce__(self) -> tuple:
        return (KeptFromWeights, ())
