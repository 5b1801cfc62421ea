"""What the RL and SFT updates share: micro-batch plans, the log-prob pass of one micro-batch, the
scaled backward, and the optimizer step that skips a non-finite gradient."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from relift_pl.algorithms import policy_logprobs
from relift_pl.distributed import all_gather_objects, all_reduce_max, world_size_and_rank
from relift_pl.micro_batching import (
    MicroBatch,
    group_sizes,
    min_group_count,
    pad_plan,
    plan_micro_batches,
    token_budget_groups,
)
from relift_pl.update.learner import Learner


def plan(
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    prompt_width: int,
    rows: Sequence[int],
    max_seqs: int,
    max_tokens: int | None,
    device: torch.device,
) -> list[MicroBatch]:
    """Micro-batches of ``rows`` (at most ``max_seqs`` rows and ``max_tokens`` tokens each, see
    :func:`plan_micro_batches`); every rank gets the same count (collectives must match)."""
    micro = plan_micro_batches(prompt_lengths, response_lengths, prompt_width, rows, max_seqs, max_tokens)
    count = int(all_reduce_max(torch.tensor(float(len(micro)), device=device, dtype=torch.float32)))
    return pad_plan(micro, count)


def budget_group_tokens(
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    rows: Sequence[int],
    max_tokens: int,
    shards: int,
    device: torch.device,
) -> Tensor:
    """[N] response tokens of the token-budget group that holds each row of ``rows`` (0 on the
    other rows); see :func:`token_budget_groups`.

    The groups define the loss only (they never bound memory), so they are formed over the whole
    mini-batch, every rank's rows in rank order (their lengths gathered), as
    :func:`min_group_count` of them: the same rows in the same order form the same groups on any
    number of ranks, so the loss does not depend on the world size (counted per rank, the
    heaviest rank's count would set every rank's). Each rank then keeps its own rows' sizes.
    """
    rows = list(rows)
    mine = [(prompt_lengths[row] + response_lengths[row], response_lengths[row]) for row in rows]
    parts = all_gather_objects([mine])  # every rank's (tokens, response tokens), rank order
    everyone = [row for part in parts for row in part]
    costs = [tokens for tokens, _ in everyone]
    groups = token_budget_groups(costs, max_tokens, min_group_count(costs, max_tokens, shards))
    start = sum(len(part) for part in parts[: world_size_and_rank()[1]])
    sizes = group_sizes(groups, [response for _, response in everyone])[start : start + len(rows)]
    out = torch.zeros(len(prompt_lengths), device=device)  # [N]
    out[torch.tensor(rows, device=device)] = torch.tensor(sizes, device=device, dtype=out.dtype)
    return out


def global_width(width: int, device: torch.device) -> float:
    """The widest response block over ranks: the "constant" loss normaliser when none is set."""
    return float(all_reduce_max(torch.tensor(float(width), device=device, dtype=torch.float32)))


def micro_logprobs(
    model, micro: MicroBatch, input_ids: Tensor, attention_mask: Tensor, prompt_width: int,
    token_chunk: int | None, temperature: float = 1.0, with_entropy: bool = True,
    entropy_grad: bool = True, share_prompts: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """[m, r] log-probs (and entropies) of one micro-batch's response tokens, trimmed columns
    (``token_chunk``: ``algorithm.logprob_token_chunk``; ``share_prompts``: each prompt's G
    samples run their prompt once)."""
    columns = micro.columns(prompt_width)
    return policy_logprobs(
        model, input_ids[micro.rows][:, columns], attention_mask[micro.rows][:, columns],
        micro.response_len, temperature=temperature, with_entropy=with_entropy,
        entropy_grad=entropy_grad, token_chunk=token_chunk, share_prompts=share_prompts,
    )  # fmt: skip


def backward(learner: Learner, loss: Tensor, weight: float, last: bool, defer_sync: bool) -> None:
    """Accumulates ``weight`` x the gradient of ``loss``.

    DDP and FSDP2 average gradients over ranks; losses are normalised by global counts, so scaling
    by the world size turns that average into the sum the loss defines. Under FSDP2 with
    ``defer_sync`` (``algorithm.defer_grad_sync``) gradients are reduce-scattered only on the
    ``last`` backward before an optimizer step: one collective per optimizer step instead of one
    per micro-batch, at the cost of full-size unsharded gradients meanwhile.
    """
    if learner.sharded and defer_sync:
        learner.policy.set_requires_gradient_sync(last)
    learner.backward(loss * (weight * world_size_and_rank()[0]))


def optimizer_step(learner: Learner, max_norm: float, name: str, max_skips: int) -> Tensor:
    """Clips, then steps ``learner.optimizer`` unless the grad norm is not finite: that step is
    skipped and counted in ``learner.counters``, and ``max_skips`` in a row of optimizer ``name``
    (``algorithm.max_consecutive_skips``) stop the run.

    Returns:
        The grad norm before clipping (a 0-dim tensor, the same on every rank).
    """
    counters, optimizer = learner.counters, learner.optimizer
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.policy.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    # The one host read of an optimizer step: skipping must be decided on every rank alike.
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        counters.skipped_steps += 1
        skips = counters.consecutive_skips[name] = counters.consecutive_skips.get(name, 0) + 1
        if skips >= max_skips:
            raise FloatingPointError(
                f"{skips} consecutive {name} optimizer steps had a non-finite grad norm (last "
                f"at training step {learner.step}); stopping. Lower the learning rate or "
                "check the data (see algorithm.max_consecutive_skips)."
            )
        return grad_norm.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    counters.consecutive_skips[name] = 0
    counters.weights_version += 1
    return grad_norm.detach()


def move_optimizer_state(optimizer, device: torch.device | str) -> None:
    """Moves optimizer moments (the SFT AdamW's, between its rare steps) to ``device``."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Lightning wraps optimizers
    for state in inner.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                # Host-to-device may overlap; device-to-host must not (the CPU copy is read later).
                state[key] = value.to(device, non_blocking=torch.device(device).type != "cpu")
