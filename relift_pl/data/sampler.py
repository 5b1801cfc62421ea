"""A resumable batch sampler: training step s always gets the same prompts.

Batches are a pure function of (seed, step), so resuming at step s needs nothing but s (which
the module checkpoints), prefetching cannot shift the data position, and the global batch does
not depend on the world size: rank r takes every world-th row of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's row indices for steps ``start_step, start_step + 1, ...`` (endless).

    Each epoch is a fresh permutation of the rows seeded by ``(seed, epoch)``; the last partial
    batch of an epoch is dropped so every step has exactly ``global_batch_size`` prompts.

    Args:
        num_rows: rows in the training set.
        global_batch_size: prompts per step over all ranks (B).
        seed: shuffling seed.
        rank: this process's rank.
        world_size: number of ranks; must divide ``global_batch_size``.
        start_step: the first step to serve (the resumed position), or a callable read when
            iteration starts (Lightning builds the loader before it restores a checkpoint).
    """

    def __init__(self, num_rows: int, global_batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_step: int | Callable[[], int] = 0) -> None:
        if global_batch_size % world_size:
            raise ValueError(
                f"data.batch_size={global_batch_size} must be divisible by the number of ranks ({world_size})"
            )
        if num_rows < global_batch_size:
            raise ValueError(f"{num_rows} training rows are fewer than data.batch_size={global_batch_size}")
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_size

    def global_batch(self, step: int) -> list[int]:
        """Row indices of every rank's prompts at ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_rows, generator=generator)
        start = position * self.global_batch_size
        return order[start : start + self.global_batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step() if callable(self.start_step) else self.start_step
        while True:
            yield self.global_batch(step)[self.rank :: self.world_size]
            step += 1
