"""ReLIFTModule: GRPO with online SFT on the hardest questions, as a Lightning module.

One ``training_step`` reads as the method does:
  1. rollout G samples per prompt   2. reward them   3. group advantages
  4. RL update (mini-batches -> optimizer steps, micro-batches -> accumulated gradients)
  5. one SFT step on M buffered demonstrations when the buffer is full (second optimizer)
Callbacks decide *when* side work happens (weight sync before a rollout, mining the hardest
questions after the RL update, evaluation); optimizer steps happen only here.

Deviations from the reference (verl) implementation, all deliberate:
- The hardest-question buffer is filled by a callback between steps 4 and 5 of the same
  training step, so an SFT step can follow the RL step that filled the buffer.
- Optimizer steps with a non-finite grad norm are skipped and counted instead of applied.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from relift_pl.algorithms import group_advantages, policy_logprobs
from relift_pl.algorithms.mismatch import logprob_diff, truncated_is_weights
from relift_pl.buffer import DemonstrationBuffer, demo_row
from relift_pl.checkpoint import rng_state, set_rng_state
from relift_pl.config import AlgorithmConfig
from relift_pl.distributed import (
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    world_size_and_rank,
)
from relift_pl.micro_batching import MicroBatch, pad_plan, plan_micro_batches
from relift_pl.rollout.base import RolloutBatch, RolloutEngine, SamplingParams, left_pad, right_pad


@dataclass
class StepRecord:
    """What the callbacks see after an RL update (``on_rl_step_end``)."""

    rows: list[dict[str, Any]]
    """This rank's prompts of the step."""
    group_rewards: Tensor | None
    """[B_local, G] 0/1 rewards, or None when RL is off."""
    responses: list[str] | None
    """B_local * G decoded responses, prompt-major, or None when RL is off."""


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
        tis_cap: truncated importance sampling against the engine/trainer mismatch: token
            weights exp(trainer_old - engine) capped at this value multiply the PG loss. None: off.
    """

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
        tis_cap: float | None = None,
    ) -> None:
        super().__init__()
        algorithm.validate()
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        for key, value in (("max_logprob_diff", max_logprob_diff), ("tis_cap", tis_cap)):
            if value is not None and value <= 0:
                raise ValueError(f"rollout.{key} must be > 0 or null, got {value}")
        if algorithm.rl_enabled and sampling.temperature <= 0:
            raise ValueError(
                f"rollout.sampling.temperature must be > 0 for RL rollouts, got {sampling.temperature}"
            )
        self.automatic_optimization = False
        self.policy = policy
        # KL needs a frozen copy of the starting policy; without KL none is kept (no memory).
        kl_on = algorithm.rl_enabled and getattr(algorithm.pg_loss, "kl_coef", 0) > 0
        self.ref_policy = copy.deepcopy(policy).requires_grad_(False).eval() if kl_on else None
        self._sharded = False
        self.tokenizer = tokenizer
        self.algo = algorithm
        self.pg_loss = algorithm.pg_loss
        self.sft_loss = algorithm.sft_loss
        self.sampling = SamplingParams(**{**sampling.__dict__, "n": algorithm.group_size})
        self.max_steps = max_steps
        self.max_logprob_diff = max_logprob_diff
        self.tis_cap = tis_cap
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
        self.skipped_steps = 0
        self._consecutive_skips: dict[str, int] = {}  # per optimizer: an SFT step must not hide RL NaNs
        self._pending_rng_state: dict[str, Any] | None = None
        self.preempted = False  # set by the preemption callback when it stops the run
        self.weights_version = 0  # bumped by every applied optimizer step (weight-sync callbacks read it)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        if self.algo.sft_enabled and self.algo.buffer_threshold % world:
            raise ValueError(
                f"algorithm.buffer_threshold (M={self.algo.buffer_threshold}) must be divisible by "
                f"the number of ranks ({world}): each rank takes M / world rows of an SFT step"
            )
        if self.rollout_engine is None:
            self.rollout_engine = self._make_engine()
            self.rollout_engine.bind(self.policy, self.tokenizer)
        if (self.max_logprob_diff or self.tis_cap) and not self.rollout_engine.returns_logprobs:
            raise ValueError(
                "rollout.max_logprob_diff / rollout.tis_cap need an engine that returns log-probs "
                f"({type(self.rollout_engine).__name__} does not; use rollout=vllm)"
            )
        if self.reward_fn is None:
            self.reward_fn = self._make_reward()

    def teardown(self, stage: str) -> None:
        for obj in (self.reward_fn, self.rollout_engine):
            close = getattr(obj, "close", None)
            if callable(close):
                close()
        self.reward_fn = None
        self.rollout_engine = None

    def configure_model(self) -> None:
        """FSDP2 under ModelParallelStrategy: ``fully_shard`` each decoder layer, then the root.

        Optimizers are built afterwards (``configure_optimizers``), over the sharded parameters.
        With ``trainer.precision=bf16-mixed`` parameters are all-gathered and computed in bf16,
        with fp32 master weights and fp32 gradient reduction (FSDP2's MixedPrecisionPolicy).
        """
        mesh = self.device_mesh
        if mesh is None or self._sharded:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "trainer.strategy.tensor_parallel_size must be 1: relift-pl shards with FSDP2 only"
            )
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        kwargs = {"mesh": dp_mesh}
        if "bf16" in str(self.trainer.precision):
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
        for model in (self.policy, self.ref_policy):
            if model is None:
                continue
            # The model's own list of blocks that must not be split (its decoder layers).
            layer_types = set(getattr(model, "_no_split_modules", None) or ())
            for block in model.modules():
                if type(block).__name__ in layer_types:
                    fully_shard(block, **kwargs)
            fully_shard(model, **kwargs)
        self._sharded = True

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

    def _optimizer(self, name: str):
        optimizers = self.optimizers()
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        return optimizers[self._opt_index[name]]

    # -- hooks for callbacks -------------------------------------------------------------------
    def _notify(self, hook: str, *args) -> None:
        for callback in self.trainer.callbacks:
            fn = getattr(callback, hook, None)
            if callable(fn):
                fn(self.trainer, self, *args)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        """Samples from the current policy; callbacks get ``on_before_rollout`` first (weight sync)."""
        self._notify("on_before_rollout")
        engine = self.rollout_engine
        if engine.needs_weight_sync and getattr(engine, "synced_version", None) != self.weights_version:
            raise RuntimeError(
                f"{type(engine).__name__} holds weights version {engine.synced_version}, the policy "
                f"is at {self.weights_version}: no callback pushed the weights. Keep "
                "callbacks.vllm_weight_sync (callbacks.VLLMWeightSync) in the callbacks config."
            )
        where = (  # steps numbered as logged: the one in progress is step_count + 1
            f"rollout engine {type(engine).__name__} at training step {self.step_count + 1} "
            f"(RL step {self.rl_step + 1}), {len(prompt_ids)} prompts x n={sampling.n}"
        )
        try:
            batch = engine.generate(prompt_ids, sampling)
        except Exception as err:  # engine internals (CUDA, vLLM workers): say who failed, and when
            raise RuntimeError(f"{where} failed: {type(err).__name__}: {err}") from err
        expected = len(prompt_ids) * sampling.n
        if batch.response_ids.shape[0] != expected or len(batch.finish_reasons) != expected:
            raise RuntimeError(
                f"{where} returned {batch.response_ids.shape[0]} responses, expected {expected}"
            )
        return batch

    def decode_responses(self, batch: RolloutBatch) -> list[str]:
        """Response texts: the masked tokens without EOS, in one batched decode."""
        keep = batch.response_mask.bool() & (batch.response_ids != self.tokenizer.eos_token_id)
        flat = batch.response_ids[keep].tolist()  # row-major: each row's kept tokens in order
        ends = keep.sum(-1).cumsum(0).tolist()
        rows = [flat[start:end] for start, end in zip([0, *ends[:-1]], ends)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=False)

    # -- the training step ---------------------------------------------------------------------
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        record = StepRecord(rows=batch, group_rewards=None, responses=None)

        # SFT-then-RL: the first sft_warmup_steps training steps are SFT on every demonstration.
        warmup = self.step_count < self.algo.sft_warmup_steps
        if self.algo.rl_enabled and not warmup:
            rollout = self.generate([row["prompt_ids"] for row in batch], self.sampling)  # 1.
            responses = self.decode_responses(rollout)
            golds = [row["answer"] for row in batch for _ in range(self.algo.group_size)]
            scored = self.reward_fn(responses, golds)  # 2.
            rewards = torch.tensor(scored.rewards, dtype=torch.float32)  # [B*G]
            advantages = group_advantages(  # 3.
                rewards, self.algo.group_size, self.algo.scale_advantages_by_std
            )
            demos = self._batch_demos(batch) if self.algo.sft_loss_coef else None
            metrics |= self._rl_update(rollout, advantages, demos)  # 4.
            metrics |= self._rollout_metrics(rollout, rewards, scored)
            record = StepRecord(batch, rewards.view(-1, self.algo.group_size), responses)
            self.rl_step += 1

        self._notify("on_rl_step_end", record)  # the mining callback fills the buffer here

        if warmup:
            metrics |= self._sft_update(self._batch_demos(batch))
        elif self.algo.sft_enabled and (rows := self._due_sft_rows()):  # 5.
            metrics |= self._sft_update(rows)

        self.step_count += 1
        available = max(getattr(self.trainer.datamodule, "demos_available", 0), 1)
        metrics |= {
            "buffer/size": float(len(self.buffer)),
            "train/demos_used_frac": len(self.demos_used) / available,
            "train/rl_step": float(self.rl_step),
            "train/sft_step": float(self.sft_step),
            "faults/skipped_steps": float(self.skipped_steps),
            "perf/step_seconds": time.perf_counter() - started,
        }
        self._log_metrics(metrics)
        if self.step_count >= self.max_steps:
            self.trainer.should_stop = True

    def _due_sft_rows(self) -> list[dict[str, Any]] | None:
        """The rows of this training step's SFT step under ``algorithm.sft_schedule``, or None."""
        buffer, schedule = self.buffer, self.algo.sft_schedule
        if schedule == "every_step":  # whatever is buffered, up to M, split evenly over ranks
            world = world_size_and_rank()[0]
            n = min(len(buffer), buffer.threshold) // world * world
            return buffer.pop(n) if n else None
        due = schedule == "buffer" or (self.step_count + 1) % self.algo.sft_interval == 0
        return buffer.pop() if due and buffer.ready else None

    @staticmethod
    def _batch_demos(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every rank's prompts of the step that have a demonstration, the same list on all ranks."""
        return all_gather_objects([demo_row(row) for row in batch if row.get("demo_ids")])

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        sync = world_size_and_rank()[0] > 1
        self.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=sync)
        # Lightning uses a logged "step" value as the x-axis: plot against training steps,
        # not global_step (which counts RL and SFT optimizer steps together).
        self.log("step", float(self.step_count), on_step=True, on_epoch=False)
        for key in ("train/reward_mean", "sft/loss"):
            if key in metrics:
                self.log(key.split("/")[-1], metrics[key], prog_bar=True, logger=False)

    # -- micro-batches -------------------------------------------------------------------------
    def _plan(self, attention_mask: Tensor, prompt_len: int, rows: Tensor, max_seqs: int) -> list[MicroBatch]:
        """Micro-batches of ``rows``; every rank gets the same count (collectives must match)."""
        plan = plan_micro_batches(
            attention_mask, prompt_len, rows, max_seqs, self.algo.max_tokens_per_micro_batch
        )
        count = int(all_reduce_max(torch.tensor(float(len(plan)), device=self.device)))
        return pad_plan(plan, count)

    def _logprobs(self, model, micro: MicroBatch, input_ids: Tensor, attention_mask: Tensor,
                  prompt_len: int, temperature: float = 1.0, with_entropy: bool = True,
                  entropy_grad: bool = True, share_prompts: bool = False):
        columns = micro.columns(prompt_len)
        return policy_logprobs(
            model, input_ids[micro.rows][:, columns], attention_mask[micro.rows][:, columns],
            micro.response_len, temperature=temperature, with_entropy=with_entropy,
            entropy_grad=entropy_grad,
            # Each prompt's G samples: the prompt runs once (not under FSDP2: one forward per
            # micro-batch is what its hooks are tested with).
            share_prompts=share_prompts and self.algo.share_prompt_prefix and not self._sharded,
        )

    def _backward(self, loss: Tensor, micro: MicroBatch) -> None:
        # DDP and FSDP2 average gradients over ranks; losses are normalised by global counts,
        # so scaling by the world size turns that average into the sum the loss defines.
        self.manual_backward(loss * (micro.weight * world_size_and_rank()[0]))

    # -- RL ------------------------------------------------------------------------------------
    def _rl_update(
        self, rollout: RolloutBatch, advantages: Tensor, demos: list[dict[str, Any]] | None = None
    ) -> dict[str, float]:
        """PG update; with ``demos`` (RL-with-SFT-loss) each optimizer step also carries
        ``sft_loss_coef`` x the SFT loss of those demonstrations."""
        optimizer = self._optimizer("rl")
        device = self.device
        input_ids = rollout.input_ids.to(device)  # [N, P + R]
        attention_mask = rollout.attention_mask.to(device)  # [N, P + R]
        response_mask = rollout.response_mask.to(device).float()  # [N, R]
        advantages = advantages.to(device)  # [N]
        prompt_len = rollout.prompt_ids.shape[1]
        temperature = self.sampling.temperature or 1.0
        n = input_ids.shape[0]
        mini_batches = torch.arange(n).chunk(self.algo.num_mini_batches)
        micro = self.algo.micro_batch_size

        def frozen_logprobs(model) -> Tensor:  # [N, R] log-probs under a model, no gradient
            out = torch.zeros_like(response_mask)
            with torch.no_grad():
                for mb in self._plan(attention_mask, prompt_len, torch.arange(n), micro):
                    lp, _ = self._logprobs(model, mb, input_ids, attention_mask, prompt_len,
                                           temperature, with_entropy=False, share_prompts=True)
                    out[mb.rows, : mb.response_len] = lp
            return out

        # With one optimizer step per rollout the policy that sampled is the one being updated:
        # the ratio is exactly 1, so old log-probs are the current ones, detached (no extra pass).
        old_logprobs = frozen_logprobs(self.policy) if len(mini_batches) > 1 else None
        ref_logprobs = frozen_logprobs(self.ref_policy) if self.ref_policy is not None else None

        # The engine's log-probs of its own samples (vLLM): checked against the trainer's below.
        engine_logprobs = None if rollout.logprobs is None else rollout.logprobs.to(device)  # [N, R]
        trainer_old = torch.zeros_like(response_mask)  # [N, R] filled per micro-batch
        tis_weights = torch.zeros_like(response_mask) if self.tis_cap else None  # [N, R]
        totals: dict[str, float] = {}
        for mini in mini_batches:
            num_tokens = all_reduce_sum(response_mask[mini].sum())
            num_seqs = all_reduce_sum(torch.tensor(float(len(mini)), device=device))
            sums: dict[str, float] = {}
            for mb in self._plan(attention_mask, prompt_len, mini, micro):
                rows, width = mb.rows, mb.response_len
                logprobs, entropy = self._logprobs(
                    self.policy, mb, input_ids, attention_mask, prompt_len, temperature,
                    # The entropy only feeds a metric unless it has a loss weight.
                    entropy_grad=self.pg_loss.entropy_coef != 0, share_prompts=True,
                )
                mask = response_mask[rows, :width]
                old = logprobs.detach() if old_logprobs is None else old_logprobs[rows, :width]
                is_weights = None
                if self.tis_cap and engine_logprobs is not None:
                    is_weights = truncated_is_weights(
                        old, engine_logprobs[rows, :width], mask, self.tis_cap
                    )
                loss, parts = self.pg_loss(
                    logprobs, old, advantages[rows], mask, entropy=entropy, is_weights=is_weights,
                    ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows, :width],
                    num_tokens=num_tokens, num_seqs=num_seqs,
                )
                self._backward(loss, mb)
                if not mb.weight:
                    continue
                trainer_old[rows, :width] = old
                if is_weights is not None:
                    tis_weights[rows, :width] = is_weights
                share = len(rows) / len(mini)
                sums["rl/loss"] = sums.get("rl/loss", 0.0) + loss.item()
                for key, value in parts.items():
                    sums[f"rl/{key}"] = sums.get(f"rl/{key}", 0.0) + share * float(value)
            if demos:
                sums |= self._sft_backward(demos, self.algo.sft_loss_coef / len(mini_batches), "rl/sft_")
            sums["rl/grad_norm"] = self._optimizer_step(optimizer, self.algo.rl_grad_clip, "rl")
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value / len(mini_batches)
        if engine_logprobs is not None:
            totals |= self._mismatch_metrics(trainer_old, engine_logprobs, response_mask, tis_weights)
        return totals

    def _mismatch_metrics(
        self, trainer_old: Tensor, engine_logprobs: Tensor, response_mask: Tensor,
        tis_weights: Tensor | None,
    ) -> dict[str, float]:
        """Engine vs trainer log-probs of the sampled tokens (global over ranks); verifies the sync.

        Args:
            trainer_old: [N, R] the trainer's log-probs before this step's update.
            engine_logprobs: [N, R] the rollout engine's log-probs of the same tokens.
            response_mask: [N, R] 1 on response tokens.
            tis_weights: [N, R] the truncated IS weights used, or None when TIS is off.
        """
        diff = logprob_diff(trainer_old, engine_logprobs, response_mask)  # [N, R]
        count = all_reduce_sum(response_mask.sum()).clamp(min=1)
        diff_max = float(all_reduce_max(diff.max()))
        metrics = {
            "rollout/logprob_diff_mean": float(all_reduce_sum(diff.sum()) / count),
            "rollout/logprob_diff_max": diff_max,
        }
        if self.max_logprob_diff is not None and diff_max > self.max_logprob_diff:
            raise RuntimeError(
                f"training step {self.step_count} (RL step {self.rl_step}): the rollout engine's "
                f"log-probs of its sampled tokens differ from the trainer's by up to {diff_max:.4g} "
                f"(mean {metrics['rollout/logprob_diff_mean']:.3g}), above "
                f"rollout.max_logprob_diff={self.max_logprob_diff}. The engine's weights are stale "
                "or the weight sync is broken (raise the knob only if the engine's dtype explains it)."
            )
        if tis_weights is not None:
            metrics["rollout/tis_weight_mean"] = float(all_reduce_sum(tis_weights.sum()) / count)
            metrics["rollout/tis_weight_max"] = float(all_reduce_max(tis_weights.max()))
        return metrics

    def _rollout_metrics(self, rollout: RolloutBatch, rewards: Tensor, scored) -> dict[str, float]:
        lengths = rollout.response_lengths.float()
        return {
            "train/reward_mean": rewards.mean().item(),
            "train/response_length_mean": lengths.mean().item(),
            "train/response_length_max": lengths.max().item(),
            "train/truncated_frac": rollout.truncated.float().mean().item(),
            "reward/timeouts": float(getattr(scored, "timeouts", 0)),
            "reward/failures": float(getattr(scored, "failures", 0)),
        }

    # -- SFT -----------------------------------------------------------------------------------
    def _sft_update(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """One SFT step (its own optimizer) on ``rows``; each rank takes its share."""
        optimizer = self._optimizer("sft")
        self._move_optimizer_state(optimizer, self.device)
        sums = self._sft_backward(rows)
        sums["sft/grad_norm"] = self._optimizer_step(optimizer, self.algo.sft_grad_clip, "sft")
        if self.algo.offload_sft_optimizer:
            self._move_optimizer_state(optimizer, torch.device("cpu"))
        self.sft_step += 1
        return sums

    def _sft_backward(self, rows: list[dict[str, Any]], scale: float = 1.0, prefix: str = "sft/") -> dict[str, float]:
        """Accumulates ``scale`` x the SFT loss gradient of ``rows`` (the same list on every rank,
        whose length is a multiple of the world size); returns metrics named ``<prefix>...``."""
        world, rank = world_size_and_rank()
        self.demos_used.update(str(row["id"]) for row in rows)
        mine = rows[rank::world]
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad([row["prompt_ids"] for row in mine], pad)
        demo_ids, demo_mask = right_pad([row["demo_ids"] for row in mine], pad)
        input_ids = torch.cat([prompt_ids, demo_ids], 1).to(self.device)  # [m, P + R]
        attention_mask = torch.cat([prompt_mask, demo_mask], 1).to(self.device)  # [m, P + R]
        loss_mask = demo_mask.to(self.device).float()  # [m, R]: prompt tokens never enter the loss
        prompt_len = prompt_ids.shape[1]
        num_tokens = all_reduce_sum(loss_mask.sum())
        num_seqs = all_reduce_sum(torch.tensor(float(len(mine)), device=self.device))
        sums: dict[str, float] = {f"{prefix}loss": 0.0}
        plan = self._plan(attention_mask, prompt_len, torch.arange(len(mine)), self.algo.sft_micro_batch_size)
        for mb in plan:
            logprobs, entropy = self._logprobs(
                self.policy, mb, input_ids, attention_mask, prompt_len,
                entropy_grad=self.sft_loss.entropy_coef != 0,
            )
            loss, parts = self.sft_loss(
                logprobs, loss_mask[mb.rows, : mb.response_len], entropy=entropy,
                num_tokens=num_tokens, num_seqs=num_seqs,
            )
            self._backward(loss * scale, mb)
            if not mb.weight:
                continue
            sums[f"{prefix}loss"] += loss.item()
            for key, value in parts.items():
                sums[f"{prefix}{key}"] = sums.get(f"{prefix}{key}", 0.0) + float(value) * len(mb.rows) / len(mine)
        sums[f"{prefix}demo_tokens"] = float(num_tokens)
        return sums

    @staticmethod
    def _move_optimizer_state(optimizer, device: torch.device) -> None:
        """Moves optimizer moments (the SFT AdamW's, between its rare steps) to ``device``."""
        for state in optimizer.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    state[key] = value.to(device, non_blocking=True)

    # -- optimizer steps -----------------------------------------------------------------------
    def _optimizer_step(self, optimizer, max_norm: float, name: str) -> float:
        """Clips, then steps unless the grad norm is not finite (that step is skipped and counted)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not torch.isfinite(torch.tensor(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            skips = self._consecutive_skips[name] = self._consecutive_skips.get(name, 0) + 1
            if skips >= self.algo.max_consecutive_skips:
                raise FloatingPointError(
                    f"{skips} consecutive {name} optimizer steps had a non-finite grad norm (last "
                    f"at training step {self.step_count + 1}); stopping. Lower the learning rate or "
                    "check the data (see algorithm.max_consecutive_skips)."
                )
            return grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._consecutive_skips[name] = 0
        self.weights_version += 1
        return grad_norm

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["relift"] = {
            "step_count": self.step_count,
            "rl_step": self.rl_step,
            "sft_step": self.sft_step,
            "demos_used": sorted(self.demos_used),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": dict(self._consecutive_skips),
            "weights_version": self.weights_version,
            "buffer": self.buffer.state_dict(),
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["relift"]
        self.step_count = state["step_count"]
        self.rl_step = state["rl_step"]
        self.sft_step = state["sft_step"]
        self.demos_used = set(state["demos_used"])
        self.skipped_steps = state["skipped_steps"]
        skips = state["consecutive_skips"]  # an int in checkpoints from before the per-optimizer count
        self._consecutive_skips = dict(skips) if isinstance(skips, dict) else {"rl": skips, "sft": skips}
        self.weights_version = state["weights_version"]
        self.buffer.load_state_dict(state["buffer"])
        # Applied just before the next step: Lightning draws from the global RNG in between
        # (the DataLoader iterator takes a base seed), which would shift every later sample.
        self._pending_rng_state = state["rng"]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng_state is not None:
            set_rng_state(self._pending_rng_state)
            self._pending_rng_state = None
