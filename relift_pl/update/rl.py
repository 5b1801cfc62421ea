"""Step 4 of a training step: the policy-gradient update on one rollout batch.

The batch is split into ``algorithm.num_mini_batches`` mini-batches, one optimizer step each;
each mini-batch into micro-batches whose gradients accumulate. Losses are normalised by global
(all micro-batches, all ranks) token and sequence counts, so the update does not depend on
micro-batching, nor, with one mini-batch, on the world size. With several, each rank splits its
own rows, so which rollouts share an optimizer step follows the world size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from relift_pl.algorithms.mismatch import logprob_diff, truncated_is_weights
from relift_pl.config import AlgorithmConfig
from relift_pl.distributed import all_reduce_max, all_reduce_sum
from relift_pl.metrics import StepMetrics
from relift_pl.micro_batching import row_lengths
from relift_pl.rollout.base import RolloutBatch
from relift_pl.update.common import (
    backward,
    budget_group_tokens,
    global_width,
    micro_logprobs,
    optimizer_step,
    plan,
)
from relift_pl.update.learner import Learner
from relift_pl.update.mixing import off_policy_token_mask
from relift_pl.update.sft import sft_backward

MEAN_BOUND_PATIENCE = 3
log = logging.getLogger(__name__)

# Token-mean metrics of the PG loss: weighted by tokens so that ranks and micro-batches combine
# into the mean over all tokens of the mini-batch.
_TOKEN_MEANS = ("entropy", "clip_frac", "ratio_mean", "kl")
# LUFFY: means over all the step's demonstration tokens (a mini-batch without any adds nothing).
_OFF_POLICY_MEANS = ("off_policy_prob", "shaped_prob")


@dataclass(frozen=True)
class LogprobCheck:
    """The rollout engine's log-probs of its own samples against the trainer's (``rollout.*``;
    only for an engine that returns them)."""

    max_diff: float | None = None
    """``max_logprob_diff``: a bound on the largest difference (None: none)."""
    max_diff_mean: float | None = None
    """``max_logprob_diff_mean``: a bound on the mean, over MEAN_BOUND_PATIENCE RL steps in a row."""
    tis_cap: float | None = None
    """Truncated importance sampling: the cap of the token weights; None: off."""


def mini_batches(num_rows: int, count: int) -> list[list[int]]:
    """``count`` contiguous mini-batches of near-equal size (sizes differ by at most one)."""
    if not 1 <= count <= num_rows:
        raise ValueError(
            f"algorithm.num_mini_batches={count} must be in [1, {num_rows}]: a rank has "
            f"{num_rows} rollouts per step (data.batch_size / ranks x algorithm.group_size)"
        )
    return [chunk.tolist() for chunk in torch.arange(num_rows).tensor_split(count)]


def rl_update(
    learner: Learner,
    algo: AlgorithmConfig,
    rollout: RolloutBatch,
    advantages: Tensor,
    metrics: StepMetrics,
    demos: list[dict[str, Any]] | None = None,
    mixed_ids: list[str] | None = None,
    *,
    temperature: float = 1.0,
    check: LogprobCheck = LogprobCheck(),
    pad_id: int = 0,
) -> list[str]:
    """PG update with ``learner.optimizer``; metrics go into ``metrics`` (``rl/*``, ``rollout/*``).

    Args:
        learner: the policy, the RL optimizer, the counters (and the KL reference, if any).
        algo: mini- and micro-batching, ``pg_loss`` (and ``sft_loss`` with ``demos``).
        rollout: this rank's rollouts, [N, P + R] (N = local prompts x G).
        advantages: [N] per-sequence advantages.
        metrics: the step's metrics.
        demos: RL-with-SFT-loss: every optimizer step also carries ``sft_loss_coef`` x the SFT
            loss of these demonstrations (the same list on every rank).
        mixed_ids: LUFFY: ids of the demonstrations mixed into the rollouts of every rank
            (``rollout.off_policy`` marks this rank's); like ``demos`` they count as used when an
            optimizer step of this update is applied.
        temperature: the rollouts' sampling temperature (applied to the trainer's logits).
        check: the engine/trainer log-prob bounds and TIS, used when ``rollout.logprobs`` is set.
        pad_id: the tokenizer's pad id (for ``demos``).

    Returns:
        The ids of the demonstrations learned from (``demos`` and ``mixed_ids``), or none when no
        optimizer step of this update was applied.
    """
    device, pg_loss = learner.device, algo.pg_loss
    input_ids = rollout.input_ids.to(device)  # [N, P + R]
    attention_mask = rollout.attention_mask.to(device)  # [N, P + R]
    response_mask = rollout.response_mask.to(device).float()  # [N, R]
    advantages = advantages.to(device)  # [N]
    off_policy = None if rollout.off_policy is None else rollout.off_policy.to(device)  # [N] bool
    off_tokens = off_policy_token_mask(response_mask, off_policy)  # [N, R]
    sampled_mask = response_mask - off_tokens  # [N, R] tokens the engine sampled
    prompt_width = rollout.prompt_ids.shape[1]
    prompt_lengths, response_lengths = row_lengths(rollout.prompt_mask, rollout.response_mask)
    # Each prompt's G samples run their prompt once; not under FSDP2 (one forward per micro-batch
    # is what its hooks are tested with).
    share_prompts = algo.share_prompt_prefix and not learner.sharded
    n = input_ids.shape[0]
    minis = mini_batches(n, algo.num_mini_batches)
    k = len(minis)

    def micro_plan(rows, max_seqs=algo.micro_batch_size):
        return plan(prompt_lengths, response_lengths, prompt_width, rows, max_seqs,
                    algo.max_tokens_per_micro_batch, device)

    def frozen_logprobs(model) -> Tensor:  # [N, R] log-probs under a model, no gradient
        out = torch.zeros_like(response_mask)
        with torch.no_grad():
            for mb in micro_plan(range(n)):
                lp, _ = micro_logprobs(model, mb, input_ids, attention_mask, prompt_width,
                                       algo.logprob_token_chunk, temperature, with_entropy=False,
                                       share_prompts=share_prompts)
                out[mb.rows, : mb.response_len] = lp
        return out

    # With one optimizer step per rollout the policy that sampled is the one being updated:
    # the ratio is exactly 1, so old log-probs are the current ones, detached (no extra pass).
    old_logprobs = frozen_logprobs(learner.policy) if k > 1 else None
    ref_logprobs = frozen_logprobs(learner.reference) if learner.reference is not None else None
    seq_width = None
    if pg_loss.agg_mode == "constant" and pg_loss.loss_constant is None:
        seq_width = global_width(response_mask.shape[1], device)

    # The engine's log-probs of its own samples (vLLM): checked against the trainer's below.
    engine_logprobs = None if rollout.logprobs is None else rollout.logprobs.to(device)  # [N, R]
    trainer_old = torch.zeros_like(response_mask)  # [N, R] filled per micro-batch
    tis_weights = torch.zeros_like(response_mask) if check.tis_cap else None  # [N, R]
    version = learner.counters.weights_version
    if off_policy is not None:  # [2]: the step's demonstration and response tokens, all ranks
        off_and_all_tokens = all_reduce_sum(torch.stack([off_tokens.sum(), response_mask.sum()]))
    for mini in minis:
        num_tokens = all_reduce_sum(response_mask[mini].sum())
        num_seqs = all_reduce_sum(torch.tensor(float(len(mini)), device=device, dtype=torch.float32))
        group_tokens = None  # [N]: the entropy's token-budget groups, if it is reduced per group
        if pg_loss.entropy_agg_mode == "group_token_mean" and pg_loss.entropy_coef:
            group_tokens = budget_group_tokens(prompt_lengths, response_lengths, mini,
                                               pg_loss.entropy_group_max_tokens,
                                               pg_loss.entropy_group_shards, device)
        micro = micro_plan(mini)
        for i, mb in enumerate(micro):
            rows, width = mb.rows, mb.response_len
            logprobs, entropy = micro_logprobs(
                learner.policy, mb, input_ids, attention_mask, prompt_width,
                algo.logprob_token_chunk, temperature,
                # The entropy only feeds a metric unless it has a loss weight.
                entropy_grad=pg_loss.entropy_coef != 0, share_prompts=share_prompts,
            )  # fmt: skip
            mask = response_mask[rows, :width]
            old = logprobs.detach() if old_logprobs is None else old_logprobs[rows, :width]
            is_weights = None
            if check.tis_cap and engine_logprobs is not None:
                is_weights = truncated_is_weights(
                    old, engine_logprobs[rows, :width], sampled_mask[rows, :width], check.tis_cap
                )
            loss, parts = pg_loss(
                logprobs, old, advantages[rows], mask, entropy=entropy, is_weights=is_weights,
                off_policy=None if off_policy is None else off_policy[rows],
                ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows, :width],
                num_tokens=num_tokens, num_seqs=num_seqs, seq_width=seq_width,
                group_tokens=None if group_tokens is None else group_tokens[rows],
            )  # fmt: skip
            backward(learner, loss, mb.weight * algo.rl_loss_scale,
                     last=i == len(micro) - 1 and not demos, defer_sync=algo.defer_grad_sync)
            # Fillers (weight 0) add zeros: every rank must hold the same metric keys.
            share = mb.weight / k
            metrics.add("rl/loss", loss.detach() * share)
            metrics.add("rl/pg_loss", parts["pg_loss"] * share)
            token_share = mask.sum() / num_tokens.clamp(min=1) * share
            for key in _TOKEN_MEANS:
                if key in parts:
                    metrics.add(f"rl/{key}", parts[key] * token_share)
            if off_policy is not None:
                off_share = off_tokens[rows, :width].sum() / off_and_all_tokens[0].clamp(min=1) * mb.weight
                for key in _OFF_POLICY_MEANS:
                    metrics.add(f"luffy/{key}", parts[key] * off_share)
                rows_here = parts["off_rows"] * (mb.weight > 0)  # fillers add zeros
                metrics.add_mean("luffy/min_token_logprob", parts["min_token_logprob_sum"] * (mb.weight > 0), rows_here)
                metrics.add_mean("luffy/min_token_weight", parts["min_token_weight_sum"] * (mb.weight > 0), rows_here)
            if mb.weight:
                trainer_old[rows, :width] = old
                if is_weights is not None:
                    tis_weights[rows, :width] = is_weights
        if demos:
            sft_backward(learner, algo, demos, metrics, pad_id,
                         scale=algo.sft_loss_coef * algo.rl_loss_scale, prefix="rl/sft_",
                         metric_scale=1 / k)
        grad_norm = optimizer_step(learner, algo.rl_grad_clip, "rl", algo.max_consecutive_skips)
        metrics.add("rl/grad_norm", grad_norm / k, reduce="same")
    if off_policy is not None:
        off, total = off_and_all_tokens
        metrics.add("luffy/off_policy_token_frac", off / total.clamp(min=1), reduce="same")
    if engine_logprobs is not None:  # demonstrations have no engine log-probs: sampled rows only
        mismatch_metrics(learner, check, trainer_old, engine_logprobs, sampled_mask, tis_weights, metrics)
    if learner.counters.weights_version == version:
        return []
    return [str(row["id"]) for row in demos or ()] + list(mixed_ids or ())


def mismatch_metrics(
    learner: Learner, check: LogprobCheck, trainer_old: Tensor, engine_logprobs: Tensor,
    response_mask: Tensor, tis_weights: Tensor | None, metrics: StepMetrics,
) -> None:
    """Engine vs trainer log-probs of the sampled tokens (global over ranks); verifies the sync.

    Args:
        learner: its counters keep the RL steps in a row above the mean bound; its step numbers
            go into the messages.
        check: the bounds ``max_diff`` (on the max) and ``max_diff_mean``.
        trainer_old: [N, R] the trainer's log-probs before this step's update.
        engine_logprobs: [N, R] the rollout engine's log-probs of the same tokens.
        response_mask: [N, R] 1 on response tokens.
        tis_weights: [N, R] the truncated IS weights used, or None when TIS is off.
        metrics: the step's metrics.
    """
    diff = logprob_diff(trainer_old, engine_logprobs, response_mask)  # [N, R]
    count = all_reduce_sum(response_mask.sum()).clamp(min=1)
    diff_max = float(all_reduce_max(diff.max()))
    diff_mean = float(all_reduce_sum(diff.sum()) / count)
    metrics.add("rollout/logprob_diff_mean", diff_mean, reduce="same")
    metrics.add("rollout/logprob_diff_max", diff_max, reduce="same")
    # The mean bound (bf16 numerics) must be exceeded on MEAN_BOUND_PATIENCE RL steps in a row:
    # a broken sync stays broken, while a 7B run may meet one unusual batch in 500 steps.
    counters = learner.counters
    over_mean = check.max_diff_mean is not None and diff_mean > check.max_diff_mean
    counters.mismatch_strikes = counters.mismatch_strikes + 1 if over_mean else 0
    if over_mean and counters.mismatch_strikes < MEAN_BOUND_PATIENCE:
        log.warning("RL step %d: engine/trainer log-prob mean difference %.3g above "
                    "rollout.max_logprob_diff_mean=%s (%d of %d steps in a row before stopping)",
                    learner.rl_step, diff_mean, check.max_diff_mean,
                    counters.mismatch_strikes, MEAN_BOUND_PATIENCE)  # fmt: skip
    for value, bound, key, what in (
        (diff_max, check.max_diff, "max_logprob_diff", "up to"),
        (diff_mean if counters.mismatch_strikes >= MEAN_BOUND_PATIENCE else 0.0,
         check.max_diff_mean, "max_logprob_diff_mean", "on average"),
    ):
        if bound is not None and value > bound:
            raise RuntimeError(
                f"training step {learner.step} (RL step {learner.rl_step}): the rollout "
                f"engine's log-probs of its sampled tokens differ from the trainer's by {what} "
                f"{value:.4g} (max {diff_max:.4g}, mean {diff_mean:.3g}), above rollout.{key}="
                f"{bound}{f' on {MEAN_BOUND_PATIENCE} RL steps in a row' if key.endswith('mean') else ''}. The engine's "
                "weights are stale or the weight sync is broken (raise the bound only if the "
                "engine's dtype explains it)."
            )
    if tis_weights is not None:
        metrics.add("rollout/tis_weight_mean", all_reduce_sum(tis_weights.sum()) / count, "same")
        metrics.add("rollout/tis_weight_max", all_reduce_max(tis_weights.max()), "same")
