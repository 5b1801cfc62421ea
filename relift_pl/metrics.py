"""One training step's scalars: kept on the device while the step runs, reduced over ranks once.

Reading a metric with ``.item()`` right after a backward stalls the host until the GPU drains, so
values stay tensors until the step ends. Each metric names how ranks combine, because the meanings
differ: a loss normalised by global token counts is a partial sum on each rank (``sum``), a reward
mean over equal shares averages (``mean``), a longest response is a ``max``, and a value every
rank already holds identically (a clipped global grad norm, a counter) is taken as is (``same``).
Every value is float32 whatever the default dtype (``bf16-true`` sets bf16 inside a step, where
301 would round to 300).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from relift_pl.distributed import world_size_and_rank

REDUCTIONS = ("sum", "mean", "max", "same")
_TOTAL, _COUNT = "_total:", "_count:"  # the two sums behind an add_mean key


class StepMetrics:
    """Accumulates ``key -> value`` within one step (added up, or maxed for ``max``)."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[str, Tensor]] = {}

    def add(self, key: str, value: Tensor | float, reduce: str = "sum") -> None:
        """Adds ``value`` to ``key`` (``max`` keeps the larger); the reduction is fixed per key."""
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float32)
        if key in self._values:
            kind, old = self._values[key]
            if kind != reduce:
                raise ValueError(f"metric {key} is reduced by {kind}, not {reduce}")
            value = value.to(old.device)
            value = torch.maximum(old, value) if reduce == "max" else old + value
        self._values[key] = (reduce, value)

    def add_mean(self, key: str, total: Tensor | float, count: Tensor | float) -> None:
        """A mean over all ranks' items: ``total`` and ``count`` are summed over ranks and the
        ratio taken after, so ranks holding different numbers of items weigh by their count;
        a step where no rank has an item logs no value for ``key``."""
        self.add(f"{_TOTAL}{key}", total)
        self.add(f"{_COUNT}{key}", count)

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def reduce(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """Every metric combined over ranks: one collective per reduction kind, one host read.

        Every rank must have added the same keys (they run the same code; zero-weight filler
        micro-batches add zeros rather than skipping), in any order.
        """
        world = world_size_and_rank()[0]
        out: dict[str, float] = {}
        for kind in REDUCTIONS:
            keys = sorted(key for key, (r, _) in self._values.items() if r == kind)
            if not keys:
                continue
            stacked = torch.stack([self._values[key][1].to(device).reshape(()) for key in keys])
            if world > 1 and kind != "same":
                dist.all_reduce(stacked, op=dist.ReduceOp.MAX if kind == "max" else dist.ReduceOp.SUM)
                if kind == "mean":
                    stacked = stacked / world
            out |= dict(zip(keys, stacked.tolist(), strict=True))
        for key in [k for k in out if k.startswith(_TOTAL)]:
            name = key[len(_TOTAL):]
            total, count = out.pop(key), out.pop(f"{_COUNT}{name}")
            if count > 0:  # a mean over no item is no figure (not 0): the key is left out
                out[name] = total / count
        return out
