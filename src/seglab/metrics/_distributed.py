"""Cross-process reduction shared by every streaming metric.

A metric keeps additive state (counts, sums); summing it over processes gives exactly the
figures one process would compute on the whole data set. Only state that cannot be summed
(stored scores, per-image instance records) is gathered instead.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_processes(state: torch.Tensor) -> torch.Tensor:
    """Return `state` summed over all processes (a copy; the local state stays local)."""
    if not is_distributed():
        return state
    total = state.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather_objects(local: list[Any]) -> list[Any]:
    """Concatenate a picklable list from every process, in rank order."""
    if not is_distributed():
        return list(local)
    parts: list[list[Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in (part or [])]
