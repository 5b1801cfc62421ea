"""Several ranks of an update simulated in one process (tests/integration/test_reference_parity.py):
each rank's collectives are recorded, then replayed reduced over all of them."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

import relift_pl.update.common as common
import relift_pl.update.rl as rl
import relift_pl.update.sft as sft


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])



class SimulatedRanks:
    """Runs an update as each of ``world`` ranks in turn, twice: first recording every rank's
    collective inputs, then replaying each collective reduced over all ranks. Collectives come in
    the same order on every rank (they must, for real), so the i-th call of each rank matches.
    A gather returns every rank's items in rank order (while recording, ``world`` copies of the
    rank's own, which nothing keeps). Optimizer steps only collect the gradient, summed over
    ranks."""

    def __init__(self, world: int, model) -> None:
        self.world, self.model = world, model
        self.log: list[list[torch.Tensor]] = [[] for _ in range(world)]
        self.grads: list[torch.Tensor] = []
        self.rank = self.calls = self.steps = 0
        self.replay = False

    def _collective(self, reduce):
        def run(value):
            value = value.detach().clone().float()
            index, self.calls = self.calls, self.calls + 1
            if not self.replay:
                self.log[self.rank].append(value)
                return value
            return reduce(torch.stack([self.log[rank][index] for rank in range(self.world)]))

        return run

    def _gather(self, items: list) -> list:
        index, self.calls = self.calls, self.calls + 1
        if not self.replay:
            self.log[self.rank].append(list(items))
            return [item for _ in range(self.world) for item in items]
        return [item for rank in range(self.world) for item in self.log[rank][index]]

    def _optimizer_step(self, learner, max_norm, name, max_skips):
        index, self.steps = self.steps, self.steps + 1
        if self.replay:
            if index == len(self.grads):
                self.grads.append(torch.zeros_like(flat_grads(self.model)))
            self.grads[index] += flat_grads(self.model)
        self.model.zero_grad(set_to_none=True)
        return torch.tensor(0.0)

    def run(self, update) -> list[torch.Tensor]:
        """``update(rank)`` on every rank; the gradient of each optimizer step as DDP / FSDP
        leave it (their average over ranks)."""
        total = self._collective(lambda values: values.sum(0))
        largest = self._collective(lambda values: values.max(0).values)
        patches = [
            mock.patch.object(rl, "all_reduce_sum", total), mock.patch.object(rl, "all_reduce_max", largest),
            mock.patch.object(sft, "all_reduce_sum", total), mock.patch.object(common, "all_reduce_max", largest),
            mock.patch.object(common, "all_gather_objects", self._gather),
            mock.patch.object(common, "world_size_and_rank", lambda: (self.world, self.rank)),
            mock.patch.object(sft, "world_size_and_rank", lambda: (self.world, self.rank)),
            mock.patch.object(rl, "optimizer_step", self._optimizer_step),
            mock.patch.object(sft, "optimizer_step", self._optimizer_step),
        ]  # fmt: skip
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            for replay in (False, True):
                for rank in range(self.world):
                    self.replay, self.rank, self.calls, self.steps = replay, rank, 0, 0
                    self.model.zero_grad(set_to_none=True)
                    update(self.rank)
        return [grad / self.world for grad in self.grads]
