"""``torch.distributed`` helpers: which process this is, which share of the data it takes, and
exact reductions across processes.

fxquant never starts a process group itself unless asked (``init_from_env``, which the CLI calls
under ``torchrun``): without one every helper is the single-process identity, so library code calls
them unconditionally. Sharding is deterministic and interleaved (``DistributedSampler``'s rule:
rank ``r`` of ``W`` takes items ``r, r + W, r + 2W, ...`` of the shared order), so the union of the
ranks' shares is the single-process data and sums reduced across ranks equal the single-process sums.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (or without a process group): the process that writes files and prints."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``...): NCCL when CUDA is available, else gloo. Returns whether a
    group is (now) initialised; a no-op outside torchrun."""
    if is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def shutdown() -> None:
    """Leave the process group (the end of a command run under torchrun)."""
    if is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence):
    """This rank's share of ``items`` (a sequence or a tensor, sliced along its first dimension):
    ``items[rank::world]``."""
    return items[rank()::world_size()]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, in place (the identity without a process group)."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


T = TypeVar("T")
S = TypeVar("S")


def all_gather_objects(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group).
    Objects travel pickled between the processes of this run only; nothing is written."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def ordered_fold(items: Iterable[T], compute: Callable[[T], S], fold: Callable[[S], None]) -> int:
    """Run ``compute`` on this rank's share of ``items`` and ``fold`` every item's result, on every
    rank, in the items' global order. Returns the number of items.

    Item ``i`` is computed by rank ``i % W`` (``shard``'s rule); after each round of ``W`` items the
    ``W`` results are all-gathered and folded in item order. Every rank therefore performs the very
    floating-point operations of the single-process loop ``for it in items: fold(compute(it))``,
    so sums folded this way are bit-identical to one process whatever ``W`` is, while only ``W``
    results are held at a time (memory does not grow with the number of items). Every rank must
    iterate the same sequence of items (same data, same order); a different count is an error.
    """
    world, me = world_size(), rank()
    if world == 1:
        n = 0
        for item in items:
            fold(compute(item))
            n += 1
        return n
    n, mine = 0, None
    for item in items:
        if n % world == me:
            mine = compute(item)
        n += 1
        if n % world == 0:
            for result in all_gather_objects(mine):
                fold(result)
            mine = None
    if n % world:
        for result in all_gather_objects(mine)[:n % world]:
            fold(result)
    counts = all_gather_objects(n)
    if len(set(counts)) != 1:
        raise RuntimeError(f"ranks iterated different numbers of items {counts}: every rank must see the same "
                           f"batches in the same order (no per-rank shuffling)")
    return n


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


__all__ = ["is_initialized", "world_size", "rank", "is_main", "launched_by_torchrun", "init_from_env", "shutdown", "shard",
           "all_reduce_sum", "all_gather_objects", "ordered_fold", "barrier"]
