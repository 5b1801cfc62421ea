"""The few collectives the step needs; each is a no-op without a process group."""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)


def world_size_and_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_reduce_sum(value: Tensor) -> Tensor:
    """Sum over ranks (a global token or sequence count for loss normalisation)."""
    value = value.detach().clone().float()
    if world_size_and_rank()[0] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(value: Tensor) -> Tensor:
    """Max over ranks (a bound that every rank must check alike)."""
    value = value.detach().clone().float()
    if world_size_and_rank()[0] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_gather_objects(items: list[Any]) -> list[Any]:
    """Concatenates every rank's list, in rank order, on every rank."""
    world, _ = world_size_and_rank()
    if world == 1:
        return list(items)
    gathered: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def every_rank_state(state: Any) -> list[Any]:
    """Every rank's ``state``, in rank order: what a checkpoint must hold of per-rank state
    (rank 0 alone writes the module's and the callbacks' part of it)."""
    return all_gather_objects([state])


def own_rank_state(saved: list[Any], what: str) -> Any | None:
    """This rank's entry of an :func:`every_rank_state` list; None for a rank the checkpoint did
    not have (more ranks now), which keeps the state it started with."""
    world, rank = world_size_and_rank()
    if len(saved) != world:
        log.warning("the checkpoint holds the %s of %d ranks, this run has %d: ranks beyond "
                    "them keep the state they started with", what, len(saved), world)
    return saved[rank] if rank < len(saved) else None
