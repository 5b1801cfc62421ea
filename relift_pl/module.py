"""ReLIFTModule: GRPO with online SFT on the hardest questions, as a Lightning module.

One ``training_step`` reads as the method does:
  1. rollout G samples per prompt   2. reward them   3. group advantages
  4. RL update (:func:`relift_pl.update.rl_update`: mini-batches -> optimizer steps,
     micro-batches -> accumulated gradients)
  5. one SFT step on M buffered demonstrations when the buffer is full
     (:func:`relift_pl.update.sft_update`, its own optimizer)
LUFFY (``algorithm=luffy``) is the same step with each prompt's demonstration put in place of one
of its rollouts between 1 and 2 (:mod:`relift_pl.update.mixing`), and no SFT step.
Callbacks decide *when* side work happens (weight sync before a rollout, mining the hardest
questions after the RL update, evaluation); optimizer steps happen only in this module's update
units.

Deviations from the reference (verl) implementation, all deliberate:
- The hardest-question buffer is filled by a callback between steps 4 and 5 of the same
  training step, so an SFT step can follow the RL step that filled the buffer.
- Optimizer steps with a non-finite grad norm are skipped and counted instead of applied.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import seed_everything
from torch import Tensor

from relift_pl.algorithms import group_advantages
from relift_pl.algorithms.mismatch import check_logprob_bound, resolve_logprob_bounds
from relift_pl.buffer import DemonstrationBuffer, batch_demos, due_sft_rows
from relift_pl.config import AlgorithmConfig
from relift_pl.distributed import every_rank_state, world_size_and_rank
from relift_pl.metrics import StepMetrics
from relift_pl.models import float32_rotary_frequencies, restore_float32_buffers
from relift_pl.random_state import rank_rng_state, rng_state, set_rng_state
from relift_pl.rollout.base import RolloutBatch, RolloutEngine, SamplingParams, generate_checked
from relift_pl.step_report import log_step, rollout_metrics, run_totals, step_metrics, throughput
from relift_pl.stop_tokens import decode_responses
from relift_pl.strategies import fully_shard_models
from relift_pl.update import Learner, LogprobCheck, UpdateCounters, rl_update, sft_update
from relift_pl.update.common import move_optimizer_state
from relift_pl.update.mixing import mix_batch_demos
from relift_pl.update.sft import own_tokens


@dataclass
class StepRecord:
    """What the callbacks see after an RL update (``on_rl_step_end``)."""

    rows: list[dict[str, Any]]
    """This rank's prompts of the step."""
    group_rewards: Tensor | None
    """[B_local, G] 0/1 rewards, or None when RL is off."""
    responses: list[str] | None
    """B_local * G decoded responses, prompt-major, or None when RL is off."""
    sampled: Tensor | None = None
    """[B_local, G] True where the row is the policy's own sample (LUFFY mixes demonstrations
    into groups); None: all are."""


class _Counter:
    """A module attribute kept in ``module.counters``, the object the update units change."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module, owner: type | None = None):
        return self if module is None else getattr(module.counters, self.name)

    def __set__(self, module, value) -> None:
        setattr(module.counters, self.name, value)


class ReLIFTModule(L.LightningModule):
    """GRPO + interleaved SFT with manual optimization.

    Args:
        policy: the Hugging Face causal LM being trained.
        tokenizer: its tokenizer (pad and EOS ids, decoding for the reward).
        algorithm: every algorithmic knob (see :class:`AlgorithmConfig`).
        rollout_engine: factory ``() -> RolloutEngine``, called in ``setup()``.
        reward_fn: factory ``() -> callable(responses, golds) -> RewardOutput``, called in ``setup()``.
        sampling: training rollout sampling settings (``n`` is set to the group size).
        max_steps: training steps (batches) to run; each is one RL step and at most one SFT step.
        max_logprob_diff: raise when the largest |engine - trainer| log-prob of a sampled token
            exceeds it (a stale or broken weight sync); needs an engine that returns log-probs.
        max_logprob_diff_mean: the same bound on the mean over tokens (what bf16 numerics allow
            to be bounded at scale, where single tokens can differ a lot).
        tis_cap: truncated importance sampling against the engine/trainer mismatch: token
            weights exp(trainer_old - engine) capped at this value multiply the PG loss. None: off.
        seed: with several ranks, rank r reseeds its random streams with ``seed + r`` in
            ``setup()``, so ranks sample different rollouts (one process keeps ``seed``'s stream).
    """

    # What the update units count (see UpdateCounters), read and checkpointed as module attributes.
    weights_version = _Counter()  # callbacks push the weights to the engine when it moves
    skipped_steps = _Counter()
    consecutive_skips = _Counter()
    mismatch_strikes = _Counter()

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer,
        algorithm: AlgorithmConfig,
        rollout_engine: Callable[[], RolloutEngine],
        reward_fn: Callable[[], Callable],
        sampling: SamplingParams,
        max_steps: int = 50,
        max_logprob_diff: float | None = None,
        max_logprob_diff_mean: float | None = None,
        tis_cap: float | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        algorithm.validate()
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        check_logprob_bound("max_logprob_diff", max_logprob_diff)
        check_logprob_bound("max_logprob_diff_mean", max_logprob_diff_mean)
        if tis_cap is not None and tis_cap <= 0:
            raise ValueError(f"rollout.tis_cap must be > 0 or null, got {tis_cap}")
        if algorithm.rl_enabled and sampling.temperature <= 0:
            raise ValueError(
                f"rollout.sampling.temperature must be > 0 for RL rollouts, got {sampling.temperature}"
            )
        self.automatic_optimization = False
        self.policy = policy
        # KL needs a frozen copy of the starting policy; without KL none is kept (no memory).
        kl_on = algorithm.rl_enabled and getattr(algorithm.pg_loss, "kl_coef", 0) > 0
        self.ref_policy = copy.deepcopy(policy).requires_grad_(False).eval() if kl_on else None
        self.sharded = False  # set once configure_model has applied FSDP2
        self.tokenizer = tokenizer
        self.algo = algorithm
        self.pg_loss = algorithm.pg_loss
        self.sft_loss = algorithm.sft_loss
        self.sampling = SamplingParams(**{**sampling.__dict__, "n": algorithm.group_size})
        self.max_steps = max_steps
        # As configured (a number, "auto" or None); setup() resolves "auto" from the dtypes.
        self._bounds_config = (max_logprob_diff, max_logprob_diff_mean)
        self.max_logprob_diff: float | None = None
        self.max_logprob_diff_mean: float | None = None
        self.tis_cap = tis_cap
        self.seed = seed
        self._make_engine = rollout_engine
        self._make_reward = reward_fn
        self.rollout_engine: RolloutEngine | None = None
        self.reward_fn = None
        self.buffer = DemonstrationBuffer(algorithm.buffer_threshold, algorithm.buffer_capacity)
        # Lightning's global_step counts every optimizer step (RL and SFT): keep our own.
        self.step_count = 0
        self.rl_step = 0
        self.sft_step = 0
        self.demos_used: set[str] = set()
        self.counters = UpdateCounters()
        self._pending_rng_state: dict[str, Any] | None = None
        self.preempted = False  # set by the preemption callback when it stops the run
        self.metrics = StepMetrics()  # the step in progress; callbacks add to it too
        self.time_totals: dict[str, float] = {}  # timing/* summed and perf/peak_* maxed over the run
        self._sync_seconds = 0.0
        # Kept aside from a bf16-true precision plugin, which casts every floating buffer.
        self._rotary_fp32 = float32_rotary_frequencies(policy)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None)
        if stage == "fit" and hasattr(datamodule, "check_demonstrations"):  # its rows are loaded
            datamodule.check_demonstrations(self.algo.demonstration_settings)
        world, rank = world_size_and_rank()
        if self.algo.sft_enabled and self.algo.buffer_threshold % world:
            raise ValueError(
                f"algorithm.buffer_threshold (M={self.algo.buffer_threshold}) must be divisible by "
                f"the number of ranks ({world}): each rank takes M / world rows of an SFT step"
            )
        if torch.cuda.is_available():
            # cuDNN's SDPA backward returns NaN gradients on H100/H200 (torch >= 2.11) for
            # masked attention at lengths = 64 mod 128 (pytorch#196678): left-padded, trimmed
            # micro-batches hit it. Flash and memory-efficient attention remain.
            torch.backends.cuda.enable_cudnn_sdp(False)
        if self.rollout_engine is None:
            self.rollout_engine = self._make_engine()
            self.rollout_engine.bind(self.policy, self.tokenizer)
        self._resolve_logprob_bounds()
        bounds = self.max_logprob_diff or self.max_logprob_diff_mean
        if (bounds or self.tis_cap) and not self.rollout_engine.returns_logprobs:
            raise ValueError(
                "rollout.max_logprob_diff / max_logprob_diff_mean / tis_cap need an engine that "
                f"returns log-probs ({type(self.rollout_engine).__name__} does not; use rollout=vllm)"
            )
        if self.reward_fn is None:
            self.reward_fn = self._make_reward()
        if world > 1 and self.seed is not None:
            # seed_everything gave every rank the same streams: rollouts would be correlated.
            # After the engine is built (vLLM reseeds the global RNG when it starts).
            seed_everything(self.seed + rank, verbose=False)

    def _resolve_logprob_bounds(self) -> None:
        """The engine-vs-trainer log-prob bounds for this engine and precision (``auto`` follows
        the dtypes: see :func:`relift_pl.algorithms.mismatch.default_logprob_bounds`)."""
        raw_max, raw_mean = self._bounds_config
        if not self.rollout_engine.returns_logprobs:
            self.max_logprob_diff = None if raw_max == "auto" else raw_max
            self.max_logprob_diff_mean = None if raw_mean == "auto" else raw_mean
            return
        trainer = self._trainer
        self.max_logprob_diff, self.max_logprob_diff_mean = resolve_logprob_bounds(
            raw_max, raw_mean,
            engine_dtype=getattr(self.rollout_engine, "engine_dtype", None),
            trainer_precision=str(trainer.precision) if trainer is not None else "32-true",
            param_dtype=next(self.policy.parameters()).dtype,
            top_p=self.sampling.top_p, top_k=self.sampling.top_k,
            min_new_tokens=self.sampling.min_new_tokens, tis_cap=self.tis_cap,
        )  # fmt: skip

    def teardown(self, stage: str) -> None:
        for obj in (self.reward_fn, self.rollout_engine):
            close = getattr(obj, "close", None)
            if callable(close):
                close()
        self.reward_fn = None
        self.rollout_engine = None

    def configure_model(self) -> None:
        """FSDP2 under ModelParallelStrategy (:func:`fully_shard_models`); the optimizers are built
        afterwards (``configure_optimizers``), over the sharded parameters."""
        mesh = self.device_mesh
        if mesh is None or self.sharded:
            return
        bf16 = "bf16" in str(self.trainer.precision)
        fully_shard_models([self.policy, self.ref_policy], mesh, bf16)
        self.sharded = True

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizers = []
        self._opt_index: dict[str, int] = {}
        for name, factory in (("rl", self.algo.rl_optimizer), ("sft", self.algo.sft_optimizer)):
            enabled = self.algo.rl_enabled if name == "rl" else self.algo.uses_sft_optimizer
            if enabled:
                self._opt_index[name] = len(optimizers)
                optimizers.append(factory(params))
        return optimizers

    def optimizer(self, name: str):
        """The Lightning-wrapped ``rl`` or ``sft`` optimizer."""
        optimizers = self.optimizers()
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        return optimizers[self._opt_index[name]]

    def _learner(self, name: str) -> Learner:
        """What an update unit works with: the policy and the ``rl`` or ``sft`` optimizer."""
        return Learner(
            self.policy, self.optimizer(name), self.counters, self.device, self.manual_backward,
            self.sharded, self.ref_policy, step=self.step_count + 1, rl_step=self.rl_step + 1,
        )  # fmt: skip

    def on_fit_start(self) -> None:
        # After the precision plugin converted the module: put the float32 rotary frequencies back.
        restore_float32_buffers(self.policy, self._rotary_fp32)

    def on_train_start(self) -> None:
        # Lightning moves restored optimizer state to the device; an offloaded SFT AdamW lives on
        # the CPU between its steps (two Adam states over a 7B model do not fit otherwise).
        if self.algo.offload_sft_optimizer and "sft" in getattr(self, "_opt_index", {}):
            move_optimizer_state(self.optimizer("sft"), "cpu")

    # -- hooks for callbacks -------------------------------------------------------------------
    def _notify(self, hook: str, *args) -> None:
        for callback in self.trainer.callbacks:
            fn = getattr(callback, hook, None)
            if callable(fn):
                fn(self.trainer, self, *args)

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, purpose: str | None = None
    ) -> RolloutBatch:
        """Samples from the current policy; callbacks get ``on_before_rollout`` first (weight sync).

        ``purpose`` names the caller in errors (e.g. ``evaluation of aime24``); None: training.
        """
        started = time.perf_counter()
        self._notify("on_before_rollout")
        self._sync_seconds += time.perf_counter() - started
        when = (  # steps numbered as logged: the one in progress is step_count + 1
            f"during {purpose} after training step {self.step_count}" if purpose else
            f"at training step {self.step_count + 1} (RL step {self.rl_step + 1})"
        )
        # The run's precision, in evaluations too (outside training_step).
        precision = self._trainer.precision_plugin.forward_context() if self._trainer else nullcontext()
        return generate_checked(self.rollout_engine, prompt_ids, sampling, self.weights_version, when, precision)

    def decode_responses(self, batch: RolloutBatch) -> list[str]:
        """Response texts: the masked tokens without the stop tokens (:func:`decode_responses`)."""
        return decode_responses(batch, self.tokenizer, self.policy.generation_config.eos_token_id)

    @contextmanager
    def _timed(self, name: str):
        started = time.perf_counter()
        yield
        self.metrics.add(f"timing/{name}_s", time.perf_counter() - started, reduce="max")

    # -- the training step ---------------------------------------------------------------------
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        started = time.perf_counter()
        self.metrics = metrics = StepMetrics()
        record = StepRecord(rows=batch, group_rewards=None, responses=None)
        trained_tokens = 0
        pad_id = self.tokenizer.pad_token_id

        # SFT-then-RL: the first sft_warmup_steps training steps are SFT on every demonstration.
        warmup = self.step_count < self.algo.sft_warmup_steps
        if self.algo.rl_enabled and not warmup:
            self._sync_seconds = 0.0
            with self._timed("rollout"):
                rollout = self.generate([row["prompt_ids"] for row in batch], self.sampling)  # 1.
            metrics.add("timing/weight_sync_s", self._sync_seconds, reduce="max")
            mixed_ids = None
            if self.algo.mix_demos:  # LUFFY: each prompt's demonstration joins its group
                rollout, mixed_ids = mix_batch_demos(
                    rollout, batch, self.algo.group_size, pad_id, self.sampling.max_new_tokens, metrics
                )  # fmt: skip
            responses = self.decode_responses(rollout)
            golds = [row["answer"] for row in batch for _ in range(self.algo.group_size)]
            with self._timed("reward"):
                scored = self.reward_fn(responses, golds)  # 2.
            rewards = torch.tensor(scored.rewards, dtype=torch.float32)  # [B*G]
            advantages = group_advantages(  # 3.
                rewards, self.algo.group_size, self.algo.scale_advantages_by_std
            )
            demos = batch_demos(batch) if self.algo.sft_loss_coef else None
            check = LogprobCheck(self.max_logprob_diff, self.max_logprob_diff_mean, self.tis_cap)
            with self._timed("rl_update"):
                used = rl_update(  # 4.
                    self._learner("rl"), self.algo, rollout, advantages, metrics, demos, mixed_ids,
                    temperature=self.sampling.temperature, check=check, pad_id=pad_id,
                )  # fmt: skip
            self.demos_used.update(used)
            trained_tokens += int(rollout.attention_mask.sum())
            if demos:  # RL with SFT loss: the demonstrations pass with every RL optimizer step
                trained_tokens += self.algo.num_mini_batches * own_tokens(demos)
            rollout_metrics(metrics, rollout, rollout.sampled, rewards, scored)
            group = (-1, self.algo.group_size)
            record = StepRecord(batch, rewards.view(group), responses, rollout.sampled.view(group))
            self.rl_step += 1

        self._notify("on_rl_step_end", record)  # the mining callback fills the buffer here

        rows = batch_demos(batch) if warmup else due_sft_rows(self.buffer, self.algo, self.step_count + 1)
        if rows:
            with self._timed("sft"):
                used = sft_update(self._learner("sft"), self.algo, rows, metrics, pad_id)  # 5.
            self.demos_used.update(used)
            self.sft_step += 1
            trained_tokens += own_tokens(rows)

        self.step_count += 1
        self._report(time.perf_counter() - started, trained_tokens)
        if self.step_count >= self.max_steps:
            self.trainer.should_stop = True

    def _report(self, seconds: float, trained_tokens: int) -> None:
        """The step's counters, time and throughput, logged at the training step."""
        step_metrics(
            self.metrics, seconds, trained_tokens, self.device, buffer_size=len(self.buffer),
            demos_used=len(self.demos_used),
            demos_available=getattr(self.trainer.datamodule, "demos_available", 0),
            rl_step=self.rl_step, sft_step=self.sft_step, skipped_steps=self.skipped_steps,
        )  # fmt: skip
        values = self.metrics.reduce(self.device)
        values.update(throughput(values, self.policy, self.device))
        self.time_totals = run_totals(self.time_totals, values)
        log_step(self.trainer, values, self.step_count, self.log)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["relift"] = {
            "step_count": self.step_count,
            "rl_step": self.rl_step,
            "sft_step": self.sft_step,
            "demos_used": sorted(self.demos_used),
            **self.counters.state_dict(),
            "buffer": self.buffer.state_dict(),
            "time_totals": dict(self.time_totals),
            # Every rank's streams: ranks must not resume identical. A save before the first
            # step of a resume holds the streams that step will start from.
            "rng": every_rank_state(self._pending_rng_state or rng_state()),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["relift"]
        self.step_count = state["step_count"]
        self.rl_step = state["rl_step"]
        self.sft_step = state["sft_step"]
        self.demos_used = set(state["demos_used"])
        self.counters.load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])
        self.time_totals = dict(state.get("time_totals", {}))  # absent in older checkpoints
        # Applied just before the next step: Lightning draws from the global RNG in between
        # (the DataLoader iterator takes a base seed), which would shift every later sample.
        self._pending_rng_state = rank_rng_state(state["rng"])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.step_count >= self.max_steps or self.preempted:
            # A finished run resumed (a requeue) or a stop requested before this step: no step.
            self.trainer.should_stop = True
            return -1
        if self._pending_rng_state is not None:
            set_rng_state(self._pending_rng_state)
            self._pending_rng_state = None
        return None
