"""Benchmark evaluation: avg@k and pass@k on held-out sets, sampled through the run's rollout engine."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from relift_pl.rollout.base import SamplingParams


class BenchmarkEvaluation(L.Callback):
    """Evaluates the policy on the datamodule's ``eval_sets`` before, during and after training.

    For each set it samples ``k`` completions per problem and logs ``val/<set>/avg@k`` (mean
    correctness), ``val/<set>/pass@k`` (any correct) and ``val/avg`` (mean of the avg@k values).
    torchmetrics reduces the per-problem values across ranks, so each rank can score its share.

    Args:
        every_n_steps: evaluate every n training steps (0: only before/after training).
        k: samples per problem.
        temperature: sampling temperature (the reference evaluates at 0.6).
        top_p: nucleus mass.
        max_new_tokens: longest completion.
        max_problems: first n problems of each set (keeps CPU runs short); None for all.
        batch_prompts: prompts per generate call.
        before_training: evaluate the starting policy too (the "before" column of the summary).
        after_training: evaluate once more at the end if the last step was not evaluated.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        k: int = 4,
        temperature: float = 0.6,
        top_p: float = 1.0,
        max_new_tokens: int = 1024,
        max_problems: int | None = None,
        batch_prompts: int = 64,
        before_training: bool = True,
        after_training: bool = True,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.sampling = SamplingParams(
            n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
        )
        self.max_problems = max_problems
        self.batch_prompts = batch_prompts
        self.before_training = before_training
        self.after_training = after_training
        self.history: list[tuple[int, dict[str, float]]] = []

    @property
    def k(self) -> int:
        return self.sampling.n

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        if self.before_training and not self.history:
            self.run(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module, *args: Any) -> None:
        if self.every_n_steps and module.step_count % self.every_n_steps == 0:
            self.run(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        if self.after_training and (not self.history or self.history[-1][0] != module.step_count):
            self.run(trainer, module)

    @torch.no_grad()
    def run(self, trainer: L.Trainer, module) -> dict[str, float]:
        """Scores every eval set now, logs the values and appends them to ``history``."""
        eval_sets = getattr(trainer.datamodule, "eval_sets", {}) or {}
        results: dict[str, float] = {}
        for name, rows in eval_sets.items():
            results |= self.score_set(module, name, rows[: self.max_problems])
        if results:
            avgs = [v for key, v in results.items() if key.endswith(f"avg@{self.k}")]
            results["val/avg"] = sum(avgs) / len(avgs)
            for logger in trainer.loggers:
                logger.log_metrics(results, step=module.step_count)
            # ModelCheckpoint(monitor="val/avg") reads callback_metrics.
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in results.items()})
            self.history.append((module.step_count, results))
        return results

    def score_set(self, module, name: str, rows: list[dict[str, Any]]) -> dict[str, float]:
        world, rank = module.trainer.world_size, module.trainer.global_rank
        mine = rows[rank::world]
        avg, pas = MeanMetric(), MeanMetric()
        # Every rank runs the same number of generate calls (sharded engines need all ranks).
        per_rank = -(-len(rows) // world)
        for start in range(0, per_rank, self.batch_prompts):
            chunk = mine[start : start + self.batch_prompts]
            prompts = [row["prompt_ids"] for row in chunk] or [rows[0]["prompt_ids"]]
            batch = module.generate(prompts, self.sampling)
            if not chunk:
                continue
            texts = module.decode_responses(batch)
            golds = [row["answer"] for row in chunk for _ in range(self.k)]
            correct = torch.tensor(module.reward_fn(texts, golds).rewards).view(-1, self.k)
            avg.update(correct.mean(dim=1))
            pas.update(correct.amax(dim=1))
        return {
            f"val/{name}/avg@{self.k}": float(avg.compute()),
            f"val/{name}/pass@{self.k}": float(pas.compute()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [tuple(item) for item in state["history"]]

