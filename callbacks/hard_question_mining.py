"""Hard-question mining: after each RL update, demonstrations of the hardest prompts go into the buffer."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch

from relift_pl.buffer import demo_row
from relift_pl.distributed import all_gather_objects, every_rank_state, own_rank_state
from relift_pl.random_state import nested_tuples


class HardQuestionMining(L.Callback):
    """Marks prompts whose G rewards are all 0 as hardest and pushes their rows into the buffer.

    Rows are gathered from every rank before the push, so all ranks hold the same buffer and take
    the SFT step together (no rank waits in a collective the others never enter).

    Which rows are chosen is ``algorithm.buffer_selection``: ``hardest`` (ReLIFT), ``all`` (SFT on
    every demonstration) or ``random`` (the ablation: as many rows as were hardest, drawn at random).

    Args:
        seed: seed of the ``random`` selection.
    """

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self.rows_without_demo = 0

    def on_rl_step_end(self, trainer: L.Trainer, module, record) -> None:
        rows, group_rewards = record.rows, record.group_rewards
        if group_rewards is not None:
            for key, (count, total) in self._solve_rates(group_rewards, record.sampled).items():
                module.metrics.add_mean(key, count, total)
        # An SFT warm-up step (no rollouts although RL is on): nothing is known to be hardest, and
        # the warm-up has already trained on these rows' demonstrations.
        if not module.algo.sft_enabled or (group_rewards is None and module.algo.rl_enabled):
            return
        chosen = self._choose(module.algo.buffer_selection, rows, group_rewards)
        usable = [demo_row(row) for row in chosen if row.get("demo_ids")]
        self.rows_without_demo += len(chosen) - len(usable)
        module.buffer.push(all_gather_objects(usable))

    def _choose(self, selection: str, rows: list[dict[str, Any]], group_rewards: torch.Tensor | None):
        if selection == "all":
            return list(rows)
        hardest = (group_rewards.sum(dim=1) == 0).tolist()  # [B] every rollout failed
        if selection == "hardest":
            return [row for row, hard in zip(rows, hardest) if hard]
        return self._rng.sample(list(rows), k=sum(hardest))

    @staticmethod
    def _solve_rates(group_rewards: torch.Tensor, sampled: torch.Tensor | None = None):
        """``{rate: (prompts, prompts counted)}`` over the policy's own samples of each group
        (LUFFY's demonstration is not a rollout: it does not make a question solved)."""
        own = torch.ones_like(group_rewards, dtype=torch.bool) if sampled is None else sampled.bool()
        solved = (group_rewards * own).gt(0).sum(dim=1)  # [B] correct own samples per prompt
        prompts = float(group_rewards.shape[0])
        return {
            "train/solve_none_rate": ((solved == 0).float().sum(), prompts),
            "train/solve_all_rate": ((solved == own.sum(dim=1)).float().sum(), prompts),
            "train/solved_rate": ((solved > 0).float().sum(), prompts),
        }

    def state_dict(self) -> dict[str, Any]:
        # Every rank's: each draws from its own generator (as many rows as it has hardest ones)
        # and counts its own rows, and rank 0 alone writes the checkpoint.
        return {"ranks": every_rank_state({"rng": self._rng.getstate(), "rows_without_demo": self.rows_without_demo})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Older checkpoints hold rank 0's state only.
        own = own_rank_state(state["ranks"], "hard-question mining state") if "ranks" in state else state
        if own is not None:
            self._rng.setstate(nested_tuples(own["rng"]))
            self.rows_without_demo = own["rows_without_demo"]

