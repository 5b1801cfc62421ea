"""Benchmark evaluation: avg@k and pass@k on held-out sets, sampled through the run's rollout engine.

The callback decides WHEN (before training, every n training steps, at the last step); the scoring
itself (:meth:`BenchmarkEvaluation.evaluate`) is also what ``evaluate.py`` runs, so a score in a
training log and one in ``results.md`` come from the same code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from relift_pl.distributed import all_gather_objects, all_reduce_sum, world_size_and_rank
from relift_pl.rollout.base import SamplingParams

log = logging.getLogger(__name__)

# progress(set name, problems scored so far on this rank, problems on this rank)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SetScore:
    """One benchmark's result."""

    name: str
    avg_at_k: float
    """Mean correctness of the k samples, averaged over problems (the paper's avg@k)."""
    pass_at_k: float
    """Share of problems with at least one correct sample among k."""
    num_problems: int
    """Problems scored (after the problem limit), over all ranks."""
    k: int
    per_problem: dict[str, float] = field(default_factory=dict)
    """Problem id -> share of its k samples that were correct (all ranks' problems)."""
    response_tokens: dict[str, float] = field(default_factory=dict)
    """Problem id -> mean response length of its k samples, in tokens."""
    timeouts: int = 0
    """Responses whose grading hit the reward's time limit (scored 0), over all ranks."""
    failures: int = 0
    """Responses whose grading crashed or raised (scored 0), over all ranks."""

    def metrics(self) -> dict[str, float]:
        return {
            f"val/{self.name}/avg@{self.k}": self.avg_at_k,
            f"val/{self.name}/pass@{self.k}": self.pass_at_k,
        }


def metrics_of(scores: list[SetScore]) -> dict[str, float]:
    """``val/<set>/avg@k``, ``val/<set>/pass@k`` (each set with its own k), ``val/avg`` (mean of
    the avg@k values) and ``val/reward_timeouts`` / ``val/reward_failures`` (summed over sets)."""
    metrics: dict[str, float] = {}
    for score in scores:
        metrics |= score.metrics()
    if scores:
        metrics["val/avg"] = sum(s.avg_at_k for s in scores) / len(scores)
        metrics["val/reward_timeouts"] = sum(s.timeouts for s in scores)
        metrics["val/reward_failures"] = sum(s.failures for s in scores)
    return metrics


def _check_set_names(key: str, names: Mapping[str, Any] | None, eval_sets: Mapping) -> None:
    """Fails when a per-set setting names a set that is not evaluated (a typo would be ignored)."""
    unknown = set(names or {}) - set(eval_sets)
    if unknown:
        raise ValueError(
            f"callbacks.evaluation.{key} names {sorted(unknown)}, which are not eval sets; the "
            f"eval sets are {sorted(eval_sets)}"
        )


def keep_lines_to(path: Path, step: int) -> None:
    """Drops the lines of ``path`` (``per_problem.jsonl``) whose step is after ``step``, and a
    last line a kill cut short."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")  # a kill while writing leaves the file whole
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class EvaluationStopped(Exception):
    """A preemption signal arrived during an evaluation; it is abandoned on every rank."""


def _preemption(trainer):
    """The run's preemption callback, or None."""
    from callbacks.preemption import PreemptionCheckpoint

    callbacks = getattr(trainer, "callbacks", ())
    return next((c for c in callbacks if isinstance(c, PreemptionCheckpoint)), None)


def _stop_requested(trainer, module) -> bool:
    """Whether any rank received a preemption signal (a collective: every rank calls it)."""
    preemption = _preemption(trainer)
    return preemption is not None and preemption.stop_agreed(module)


class BenchmarkEvaluation(L.Callback):
    """Evaluates the policy on the datamodule's ``eval_sets`` before, during and after training.

    For each set it samples k completions per problem (``k``, or the set's ``k_per_set``) and
    logs ``val/<set>/avg@k`` (mean correctness), ``val/<set>/pass@k`` (any correct), ``val/avg``
    (mean of the avg@k values) and the grading's ``val/reward_timeouts`` /
    ``val/reward_failures``. torchmetrics reduces the per-problem values across ranks, so each rank
    scores its share. A row's ``grading`` field (``choice`` for GPQA / ARC-c) reaches the reward
    as its mode. Every evaluation during training (the last step's included) runs in
    ``on_train_batch_end``, so ``val/avg`` lands in ``trainer.callback_metrics`` before any
    checkpoint callback of the same step runs (Lightning orders those last), and
    ``ModelCheckpoint(monitor="val/avg")`` with the same period keeps the best.

    Args:
        every_n_steps: evaluate every n training steps (0: only before/after training).
        k: samples per problem. At temperature 0 each problem is sampled once and its response
            counted k times (greedy decoding is deterministic; engines refuse n > 1 there).
        k_per_set: ``{set name: k}`` for sets scored with another k (the paper: 32 on AIME24,
            AIME25 and AMC23, 8 on MATH-500 and OlympiadBench); the others use ``k``.
        temperature: sampling temperature (the reference evaluates at 0.6).
        top_p: nucleus mass.
        max_new_tokens: longest completion.
        max_problems: first n problems of each set (keeps CPU runs short): one int for every
            set, or ``{set name: n}`` for some sets (the others are scored whole); None for all.
        batch_prompts: prompts per generate call.
        before_training: evaluate the starting policy too (the "before" column of the summary).
        after_training: evaluate the last training step (``module.max_steps``) if the period
            did not, and at the end of a run that stopped earlier (not after a preemption).
        seed: sampling seed, so the same policy gets the same score, and evaluation leaves the
            training random streams untouched (so a resume that redoes an interrupted
            evaluation continues training exactly; hence no "global streams" option).
        per_problem_file: if set, every evaluation appends one JSON line per set to this file:
            ``{"step", "set", "k", "correct": {problem id: share of k samples correct},
            "tokens": {problem id: mean response tokens}}``
            (what per-question analyses such as the toy study's capability map read).
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        k: int = 4,
        k_per_set: Mapping[str, int] | None = None,
        temperature: float = 0.6,
        top_p: float = 1.0,
        max_new_tokens: int = 1024,
        max_problems: int | Mapping[str, int] | None = None,
        batch_prompts: int = 64,
        before_training: bool = True,
        after_training: bool = True,
        seed: int = 0,
        per_problem_file: str | None = None,
    ) -> None:
        if batch_prompts < 1:
            raise ValueError(f"callbacks.evaluation.batch_prompts must be >= 1, got {batch_prompts}")
        if k < 1:
            raise ValueError(f"callbacks.evaluation.k must be >= 1 (samples per problem), got {k}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(
                f"callbacks.evaluation.seed must be an integer, got {seed!r}: evaluation samples from "
                "its own stream, so training's (and an exact resume) never depend on when it evaluates"
            )
        for name, n in (k_per_set or {}).items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"callbacks.evaluation.k_per_set.{name} must be >= 1, got {n!r}")
        self.every_n_steps = every_n_steps
        self.sampling = SamplingParams(
            n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
        )
        self.k_per_set = dict(k_per_set or {})
        self.max_problems = max_problems
        self.batch_prompts = batch_prompts
        self.before_training = before_training
        self.after_training = after_training
        self.seed = seed
        self.per_problem_file = per_problem_file
        self.history: list[tuple[int, dict[str, float]]] = []
        self._should_stop = None  # set while run() evaluates
        self.last_eval_step = -1
        """``module.step_count`` of the newest evaluation; -1 before the first."""

    @property
    def k(self) -> int:
        """The k of sets without a ``k_per_set`` entry."""
        return self.sampling.n

    def k_of(self, name: str) -> int:
        return self.k_per_set.get(name, self.k)

    # -- when ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, module) -> None:
        step = module.step_count
        if step == 0:
            redo = self.before_training and not self.history
        else:  # resumed from a preemption at a step due for evaluation: that evaluation first
            redo = self._due(step, module) and self.last_eval_step != step
        if self.per_problem_file and trainer.is_global_zero:
            # A resumed run keeps the lines of the evaluations its checkpoint had seen (later ones
            # are done again); a fresh run in a used folder starts a fresh file.
            keep_to = step - 1 if redo else step
            keep_lines_to(Path(self.per_problem_file), keep_to if trainer.ckpt_path else -1)
        if redo:
            self.run(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module, *args: Any) -> None:
        if getattr(module, "preempted", False):
            return  # preempted.ckpt is written (its callback runs first): leave within the grace time
        step = module.step_count
        # The last step here, not in on_train_end: checkpoint callbacks of this step see it.
        if self._due(step, module) and self.last_eval_step != step:
            self.run(trainer, module)

    def _due(self, step: int, module) -> bool:
        """Whether training step ``step`` is evaluated: the period, or the last step."""
        periodic = self.every_n_steps and step % self.every_n_steps == 0
        return bool(periodic or (self.after_training and step >= module.max_steps))

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        if getattr(module, "preempted", False):
            return  # a preempted run leaves quickly; the resumed run evaluates at its end
        if self.after_training and self.last_eval_step != module.step_count:
            self.run(trainer, module)  # a run that stopped before max_steps

    def run(self, trainer: L.Trainer, module, eval_sets=None) -> dict[str, float]:
        """Scores every eval set now, logs the values and appends them to ``history``.

        Args:
            trainer: logs go to its loggers; ``val/...`` into its ``callback_metrics``.
            module: the policy module (``generate``, ``decode_responses``, ``reward_fn``).
            eval_sets: name -> tokenized rows; default: ``trainer.datamodule.eval_sets``.
        """
        if eval_sets is None:
            eval_sets = getattr(trainer.datamodule, "eval_sets", {}) or {}
        started = time.perf_counter()
        # A preemption signal stops an evaluation between generate calls (at 7B one evaluation
        # is many minutes, longer than a scheduler's grace period): nothing of it is logged.
        self._should_stop = functools.partial(_stop_requested, trainer, module)
        try:
            scores = self.evaluate(module, eval_sets)
        except EvaluationStopped:
            log.warning("evaluation at step %d stopped by a preemption signal", module.step_count)
            # preempted.ckpt now, before the step's other saves: the resumed run evaluates first.
            _preemption(trainer).save_and_stop(trainer, module)
            return {}
        finally:
            self._should_stop = None
        seconds = time.perf_counter() - started
        results = metrics_of(scores)
        if scores and self.per_problem_file and trainer.is_global_zero:
            path = Path(self.per_problem_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                for score in scores:
                    line = {"step": module.step_count, "set": score.name, "k": score.k,
                            "correct": score.per_problem, "tokens": score.response_tokens}
                    f.write(json.dumps(line) + "\n")
        if results:
            for logger in trainer.loggers:
                logger.log_metrics({**results, "timing/eval_s": seconds}, step=module.step_count)
            totals = getattr(module, "time_totals", None)
            if totals is not None:  # the run summary's time split
                totals["timing/eval_s"] = totals.get("timing/eval_s", 0.0) + seconds
            # ModelCheckpoint(monitor="val/avg") reads callback_metrics.
            trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in results.items()})
            self.history.append((module.step_count, results))
            self.last_eval_step = module.step_count
        return results

    # -- how -----------------------------------------------------------------------------------
    def limit(self, name: str) -> int | None:
        """The problem limit of set ``name``."""
        if isinstance(self.max_problems, Mapping):
            return self.max_problems.get(name)
        return self.max_problems

    @torch.no_grad()
    def evaluate(
        self, module, eval_sets: Mapping[str, list[dict[str, Any]]], progress: Progress | None = None
    ) -> list[SetScore]:
        """Scores each set (first :meth:`limit` problems) with the module's engine and reward."""
        if isinstance(self.max_problems, Mapping):
            _check_set_names("max_problems", self.max_problems, eval_sets)
        _check_set_names("k_per_set", self.k_per_set, eval_sets)
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        engine = getattr(module, "rollout_engine", None)
        awake = engine.awake() if engine is not None else contextlib.nullcontext()
        # One wake-up (and weight push) for the whole evaluation, not one per set.
        with awake, torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + world_size_and_rank()[1])
            return [
                self.score_set(module, name, rows[: self.limit(name)], progress)
                for name, rows in eval_sets.items()
                if rows
            ]

    def score_set(
        self, module, name: str, rows: list[dict[str, Any]], progress: Progress | None = None
    ) -> SetScore:
        """Samples k completions per problem of ``rows`` (one at temperature 0) and grades them."""
        k = self.k_of(name)
        greedy = self.sampling.temperature == 0
        # Greedy: one sample per problem, counted k times (the same as k greedy samples).
        sampling = replace(self.sampling, n=1 if greedy else k)
        world, rank = world_size_and_rank()
        mine = rows[rank::world]
        # On the module's device: NCCL cannot reduce CPU tensors across ranks.
        avg, pas = MeanMetric().to(module.device), MeanMetric().to(module.device)
        per_problem: dict[str, float] = {}
        tokens: dict[str, float] = {}
        troubles = torch.zeros(2, device=module.device)  # grading timeouts, failures
        # Every rank runs the same number of generate calls (sharded engines need all ranks).
        per_rank = -(-len(rows) // world)
        for start in range(0, per_rank, self.batch_prompts):
            if self._should_stop is not None and self._should_stop():  # every rank alike
                raise EvaluationStopped
            chunk = mine[start : start + self.batch_prompts]
            prompts = [row["prompt_ids"] for row in chunk] or [rows[0]["prompt_ids"]]
            batch = module.generate(prompts, sampling, purpose=f"evaluation of {name}")
            if not chunk:
                continue
            texts = module.decode_responses(batch)
            golds = [row["answer"] for row in chunk for _ in range(sampling.n)]
            modes = [row.get("grading") for row in chunk for _ in range(sampling.n)]
            extra = {"modes": modes} if any(modes) else {}  # plain reward callables work too
            scored = module.reward_fn(texts, golds, **extra)
            troubles += torch.tensor([scored.timeouts, scored.failures], device=module.device, dtype=torch.float32)
            correct = torch.tensor(scored.rewards, device=module.device, dtype=torch.float32).view(-1, sampling.n)
            correct = correct.repeat_interleave(k // sampling.n, dim=1)  # [P, k]
            avg.update(correct.mean(dim=1))
            lengths = batch.response_mask.sum(dim=1).float().view(-1, sampling.n).mean(dim=1)  # [P]
            per_problem |= {str(row["id"]): v for row, v in zip(chunk, correct.mean(dim=1).tolist())}
            tokens |= {str(row["id"]): v for row, v in zip(chunk, lengths.tolist())}
            pas.update(correct.amax(dim=1))
            if progress is not None:
                progress(name, start + len(chunk), len(mine))
        merged = [
            {key: v for part in all_gather_objects([d]) for key, v in part.items()}
            for d in (per_problem, tokens)
        ]
        timeouts, failures = (int(v) for v in all_reduce_sum(troubles).tolist())
        return SetScore(
            name, float(avg.compute()), float(pas.compute()), len(rows), k, *merged,
            timeouts=timeouts, failures=failures,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_eval_step": self.last_eval_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [tuple(item) for item in state["history"]]
        # Checkpoints from before the field: the newest evaluation in the history.
        newest = self.history[-1][0] if self.history else -1
        self.last_eval_step = state.get("last_eval_step", newest)
