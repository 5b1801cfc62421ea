"""The hardest-question buffer: demonstrations waiting for the next SFT step, and which of them
a training step's SFT step takes (``algorithm.sft_schedule``)."""

from __future__ import annotations

from collections import deque
from typing import Any

from relift_pl.config import AlgorithmConfig
from relift_pl.distributed import all_gather_objects, world_size_and_rank


def demo_row(row: dict[str, Any]) -> dict[str, Any]:
    """Only what an SFT step needs: what travels between ranks and into checkpoints."""
    return {"id": row["id"], "prompt_ids": row["prompt_ids"], "demo_ids": row["demo_ids"]}


def batch_demos(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's prompts of the step that have a demonstration, the same list on all ranks."""
    return all_gather_objects([demo_row(row) for row in batch if row.get("demo_ids")])


class DemonstrationBuffer:
    """A bounded, newest-first queue of demonstration rows.

    ReLIFT pushes a prompt's row when all of its G rollouts fail and runs one SFT step as soon as
    ``len(buffer) >= threshold``, on the ``threshold`` newest rows; the rest stay for later.

    Args:
        threshold: rows per SFT step (the paper's M).
        capacity: most rows kept; beyond it the oldest are dropped (and counted).
    """

    def __init__(self, threshold: int, capacity: int | None = None) -> None:
        capacity = capacity if capacity is not None else 4 * threshold
        if threshold < 1:
            raise ValueError(f"algorithm.buffer_threshold (M) must be >= 1, got {threshold}")
        if capacity < threshold:
            raise ValueError(
                f"algorithm.buffer_capacity must be >= buffer_threshold (M={threshold}), got {capacity}"
            )
        self.threshold = threshold
        self.capacity = capacity
        self._rows: deque[dict[str, Any]] = deque()  # left end = newest
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def ready(self) -> bool:
        return len(self._rows) >= self.threshold

    def push(self, rows: list[dict[str, Any]]) -> None:
        """Adds rows; the last row of ``rows`` becomes the newest."""
        for row in rows:
            self._rows.appendleft(row)
        while len(self._rows) > self.capacity:
            self._rows.pop()
            self.dropped += 1

    def pop(self, n: int | None = None) -> list[dict[str, Any]]:
        """Removes and returns the ``n`` (default ``threshold``) newest rows (newest first)."""
        n = self.threshold if n is None else n
        if len(self) < n:
            raise RuntimeError(f"buffer holds {len(self)} rows, fewer than the {n} requested")
        return [self._rows.popleft() for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self._rows), "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = list(state["rows"])
        if len(rows) > self.capacity:
            raise ValueError(
                f"checkpointed buffer holds {len(rows)} rows, more than capacity {self.capacity}"
            )
        self._rows = deque(rows)
        self.dropped = int(state["dropped"])


def due_sft_rows(
    buffer: DemonstrationBuffer, algo: AlgorithmConfig, step: int
) -> list[dict[str, Any]] | None:
    """The rows of training step ``step``'s (1-based) SFT step under ``algorithm.sft_schedule``,
    taken from ``buffer``; None when no SFT step is due."""
    if not algo.sft_enabled:
        return None
    schedule = algo.sft_schedule
    if schedule == "every_step":  # whatever is buffered, up to M, split evenly over ranks
        world = world_size_and_rank()[0]
        n = min(len(buffer), buffer.threshold) // world * world
        return buffer.pop(n) if n else None
    due = schedule == "buffer" or step % algo.sft_interval == 0
    return buffer.pop() if due and buffer.ready else None
