"""The few collectives the step needs; each is a no-op without a process group."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor


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

