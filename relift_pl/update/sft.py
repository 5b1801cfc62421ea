"""Step 5 of a training step: one SFT step on demonstrations, with its own optimizer.

Each demonstration replaces a rollout: [prompt | demonstration], prompt tokens masked from the
loss. The row list is the same on every rank (buffer rows are gathered before they are pushed);
rank r takes rows r, r + world, ... and a rank left without rows runs one zero-weight row, because
every rank must take part in every collective (FSDP2 all-gathers, DDP all-reduces).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from relift_pl.config import AlgorithmConfig
from relift_pl.distributed import all_reduce_sum, world_size_and_rank
from relift_pl.metrics import StepMetrics
from relift_pl.micro_batching import group_sizes
from relift_pl.rollout.base import left_pad, right_pad
from relift_pl.update.common import (
    backward,
    global_width,
    micro_logprobs,
    move_optimizer_state,
    optimizer_step,
    plan,
)
from relift_pl.update.learner import Learner


def sft_update(
    learner: Learner, algo: AlgorithmConfig, rows: list[dict[str, Any]], metrics: StepMetrics,
    pad_id: int,
) -> list[str]:
    """One SFT step on ``rows`` (the same list on every rank) with ``learner.optimizer``.

    Returns:
        The ids of the demonstrations learned from: all of ``rows``, or none when the step was
        skipped (a non-finite gradient) or there were no rows.
    """
    if not rows:
        return []
    optimizer = learner.optimizer
    sft_backward(learner, algo, rows, metrics, pad_id, scale=algo.sft_loss_scale)
    # Back on the device only for the step itself: not resident during the backward's peak.
    move_optimizer_state(optimizer, learner.device)
    version = learner.counters.weights_version
    grad_norm = optimizer_step(learner, algo.sft_grad_clip, "sft", algo.max_consecutive_skips)
    metrics.add("sft/grad_norm", grad_norm, reduce="same")
    if algo.offload_sft_optimizer:
        move_optimizer_state(optimizer, "cpu")
    applied = learner.counters.weights_version != version
    return [str(row["id"]) for row in rows] if applied else []


def sft_backward(
    learner: Learner,
    algo: AlgorithmConfig,
    rows: list[dict[str, Any]],
    metrics: StepMetrics,
    pad_id: int,
    scale: float = 1.0,
    prefix: str = "sft/",
    metric_scale: float = 1.0,
    sync_last: bool = True,
) -> None:
    """Accumulates ``scale`` x the SFT loss gradient of ``rows``.

    Args:
        learner: the policy (its optimizer is not stepped here).
        algo: micro-batching and ``sft_loss``.
        rows: demonstration rows ``{id, prompt_ids, demo_ids}``, the same list on every rank.
        metrics: receives ``<prefix>loss``, ``nll``, ``entropy``, ``demo_tokens``, each times
            ``metric_scale`` (an average over several calls).
        pad_id: the tokenizer's pad id.
        scale: loss weight (``algorithm.sft_loss_scale``; in RL steps ``sft_loss_coef`` x
            ``rl_loss_scale``). The logged values are unscaled.
        prefix: metric namespace.
        metric_scale: multiplies the logged values.
        sync_last: the last micro-batch reduces gradients (false when more backward passes
            follow before the optimizer step).
    """
    world, rank = world_size_and_rank()
    mine = rows[rank::world]
    real = 1.0 if mine else 0.0
    mine = mine or rows[:1]  # one zero-weight row keeps this rank in the collectives
    device, sft_loss = learner.device, algo.sft_loss
    prompt_ids, prompt_mask = left_pad([row["prompt_ids"] for row in mine], pad_id)
    demo_ids, demo_mask = right_pad([row["demo_ids"] for row in mine], pad_id)
    input_ids = torch.cat([prompt_ids, demo_ids], 1).to(device)  # [m, P + R]
    attention_mask = torch.cat([prompt_mask, demo_mask], 1).to(device)  # [m, P + R]
    loss_mask = demo_mask.to(device).float() * real  # [m, R]: prompt tokens never enter the loss
    prompt_width = prompt_ids.shape[1]
    num_tokens = all_reduce_sum(loss_mask.sum())
    num_seqs = all_reduce_sum(torch.tensor(len(mine) * real, device=device, dtype=torch.float32))
    seq_width = None
    if sft_loss.agg_mode == "constant" and sft_loss.loss_constant is None:
        seq_width = global_width(demo_ids.shape[1], device)
    grouped = sft_loss.agg_mode == "group_token_mean"
    group_tokens, num_groups = row_groups(rows, sft_loss.group_rows if grouped else None, rank, world)
    group_tokens = None if group_tokens is None else group_tokens.to(device)  # [m]
    micro = plan(
        [len(row["prompt_ids"]) for row in mine], [len(row["demo_ids"]) for row in mine],
        prompt_width, range(len(mine)), algo.sft_micro_batch_size, algo.max_tokens_per_micro_batch,
        device,
    )  # fmt: skip
    for i, mb in enumerate(micro):
        logprobs, entropy = micro_logprobs(
            learner.policy, mb, input_ids, attention_mask, prompt_width, algo.logprob_token_chunk,
            entropy_grad=sft_loss.entropy_coef != 0,
        )  # fmt: skip
        mask = loss_mask[mb.rows, : mb.response_len]
        loss, parts = sft_loss(
            logprobs, mask, entropy=entropy, num_tokens=num_tokens, num_seqs=num_seqs,
            seq_width=seq_width, num_groups=num_groups,
            group_tokens=None if group_tokens is None else group_tokens[mb.rows],
        )  # fmt: skip
        weight = mb.weight * real
        backward(learner, loss * scale, weight, last=sync_last and i == len(micro) - 1,
                 defer_sync=algo.defer_grad_sync)
        share = weight * metric_scale  # fillers add zeros: every rank holds the same keys
        metrics.add(f"{prefix}loss", loss.detach() * share)
        metrics.add(f"{prefix}nll", parts["nll"] * share)
        if "entropy" in parts:
            token_share = mask.sum() / num_tokens.clamp(min=1) * share
            metrics.add(f"{prefix}entropy", parts["entropy"] * token_share)
    metrics.add(f"{prefix}demo_tokens", num_tokens * metric_scale, reduce="same")


def own_tokens(rows: list[dict[str, Any]]) -> int:
    """Prompt + demonstration tokens of this rank's share of ``rows`` (``sft_backward``'s split)."""
    world, rank = world_size_and_rank()
    return sum(len(r["prompt_ids"]) + len(r["demo_ids"]) for r in rows[rank::world])


def row_groups(
    rows: list[dict[str, Any]], group_rows: int | None, rank: int, world: int
) -> tuple[Tensor | None, int | None]:
    """The SFT loss's groups: ``group_rows`` consecutive rows of the whole list (the same on every
    rank, so the groups do not depend on the world size).

    Returns:
        ([m] demonstration tokens of the group of each of this rank's rows ``rows[rank::world]``,
        or of ``rows[:1]`` when it has none (a zero-weight row), and the number of groups); or
        (None, None) without ``group_rows``.
    """
    if group_rows is None:
        return None, None
    starts = range(0, len(rows), group_rows)
    sizes = group_sizes([range(s, min(s + group_rows, len(rows))) for s in starts],
                        [len(row["demo_ids"]) for row in rows])
    return torch.tensor(sizes[rank::world] or sizes[:1], dtype=torch.float32), len(starts)
