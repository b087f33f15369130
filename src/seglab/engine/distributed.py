"""Multi-process data parallelism on torch.distributed, launched by torchrun or `--nproc N`.

torchrun (or `seglab ... --nproc N`, which does the same on one machine) starts one process per
rank with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment; the
engine reads them with :func:`init_distributed`. The backend is NCCL on CUDA and gloo on the CPU.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "shutdown_distributed", "env_rank", "shard", "launch", "all_reduce_sum", "agree", "barrier"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_rank() -> DistContext:
    """Rank, world size and local rank from torchrun's environment variables."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return DistContext(rank, world, local)


def init_distributed(device_type: str) -> DistContext:
    """Join the process group described by the environment (no-op for a single process)."""
    context = env_rank()
    if context.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=context.rank, world_size=context.world_size)
    return context


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over processes (in place); unchanged for one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and values.device.type != "cuda":  # NCCL reduces GPU tensors only
            values.copy_(all_reduce_sum(values.cuda()).cpu())
        else:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    """Wait until every process gets here (nothing for one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def agree(flag: bool) -> bool:
    """True on every rank when any rank says True, so that all ranks stop (or go on) together."""
    value = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce_sum(value).item() > 0)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank `rank`'s share of `items`: every world_size-th item; the shards are disjoint and complete."""
    return list(items[rank::world_size])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `seglab <argv>` in `nproc` local processes, as torchrun would; return the worst exit code.

    Each process gets an equal share of the CPU threads (unless OMP_NUM_THREADS is set). When
    one process fails, the others are stopped rather than left waiting for it.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be a positive number, not {nproc}")
    port = _free_port()
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    processes = []
    for rank in range(nproc):
        env = {
            **os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": threads,
        }
        processes.append(subprocess.Popen([sys.executable, "-m", "seglab", *argv], env=env))
    failed: list[int] = []
    try:
        while True:
            codes = [process.poll() for process in processes]
            failed = [code for code in codes if code not in (None, 0)]
            if failed or all(code == 0 for code in codes):
                break
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait()
    return abs(failed[0]) if failed else 0
