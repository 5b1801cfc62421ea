"""Step 5 of a training step: one SFT step on demonstrations, with its own optimizer.

Each demonstration replaces a rollout: [prompt | demonstration], prompt tokens masked from the
loss. The row list is the same on every rank (buffer rows are gathered before they are pushed);
rank r takes rows r, r + world, ... and a rank left without rows runs one zero-weight row, because
every rank must take part in every collective (FSDP2 all-gathers, DDP all-reduces).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

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

if TYPE_CHECKING:
    from relift_pl.module import ReLIFTModule


def sft_update(module: ReLIFTModule, rows: list[dict[str, Any]], metrics: StepMetrics) -> bool:
    """One SFT step on ``rows`` (the same list on every rank); returns whether it was applied.

    ``sft_step`` counts the step either way; the demonstrations count as used only when the
    update was applied (a non-finite gradient skips it).
    """
    if not rows:
        return False
    optimizer = module.optimizer("sft")
    sft_backward(module, rows, metrics, scale=module.algo.sft_loss_scale)
    # Back on the device only for the step itself: not resident during the backward's peak.
    move_optimizer_state(optimizer, module.device)
    version = module.weights_version
    grad_norm = optimizer_step(module, optimizer, module.algo.sft_grad_clip, "sft")
    metrics.add("sft/grad_norm", grad_norm, reduce="same")
    if module.algo.offload_sft_optimizer:
        move_optimizer_state(optimizer, "cpu")
    module.sft_step += 1
    applied = module.weights_version != version
    if applied:
        module.demos_used.update(str(row["id"]) for row in rows)
    return applied


def sft_backward(
    module: ReLIFTModule,
    rows: list[dict[str, Any]],
    metrics: StepMetrics,
    scale: float = 1.0,
    prefix: str = "sft/",
    metric_scale: float = 1.0,
    sync_last: bool = True,
) -> None:
    """Accumulates ``scale`` x the SFT loss gradient of ``rows``.

    Args:
        module: the ReLIFT module.
        rows: demonstration rows ``{id, prompt_ids, demo_ids}``, the same list on every rank.
        metrics: receives ``<prefix>loss``, ``nll``, ``entropy``, ``demo_tokens``, each times
            ``metric_scale`` (an average over several calls).
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
    device = module.device
    pad = module.tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([row["prompt_ids"] for row in mine], pad)
    demo_ids, demo_mask = right_pad([row["demo_ids"] for row in mine], pad)
    input_ids = torch.cat([prompt_ids, demo_ids], 1).to(device)  # [m, P + R]
    attention_mask = torch.cat([prompt_mask, demo_mask], 1).to(device)  # [m, P + R]
    loss_mask = demo_mask.to(device).float() * real  # [m, R]: prompt tokens never enter the loss
    prompt_width = prompt_ids.shape[1]
    num_tokens = all_reduce_sum(loss_mask.sum())
    num_seqs = all_reduce_sum(torch.tensor(len(mine) * real, device=device, dtype=torch.float32))
    seq_width = None
    if module.sft_loss.agg_mode == "constant" and module.sft_loss.loss_constant is None:
        seq_width = global_width(module, demo_ids.shape[1])
    grouped = module.sft_loss.agg_mode == "group_token_mean"
    group_tokens, num_groups = row_groups(rows, module.sft_loss.group_rows if grouped else None,
                                          rank, world)
    group_tokens = None if group_tokens is None else group_tokens.to(device)  # [m]
    micro = plan(
        module, [len(row["prompt_ids"]) for row in mine], [len(row["demo_ids"]) for row in mine],
        prompt_width, range(len(mine)), module.algo.sft_micro_batch_size,
    )  # fmt: skip
    for i, mb in enumerate(micro):
        logprobs, entropy = micro_logprobs(
            module, module.policy, mb, input_ids, attention_mask, prompt_width,
            entropy_grad=module.sft_loss.entropy_coef != 0,
        )  # fmt: skip
        mask = loss_mask[mb.rows, : mb.response_len]
        loss, parts = module.sft_loss(
            logprobs, mask, entropy=entropy, num_tokens=num_tokens, num_seqs=num_seqs,
            seq_width=seq_width, num_groups=num_groups,
            group_tokens=None if group_tokens is None else group_tokens[mb.rows],
        )  # fmt: skip
        weight = mb.weight * real
        backward(module, loss * scale, weight, last=sync_last and i == len(micro) - 1)
        share = weight * metric_scale  # fillers add zeros: every rank holds the same keys
        metrics.add(f"{prefix}loss", loss.detach() * share)
        metrics.add(f"{prefix}nll", parts["nll"] * share)
        if "entropy" in parts:
            token_share = mask.sum() / num_tokens.clamp(min=1) * share
            metrics.add(f"{prefix}entropy", parts["entropy"] * token_share)
    metrics.add(f"{prefix}demo_tokens", num_tokens * metric_scale, reduce="same")


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
