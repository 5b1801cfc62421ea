"""What the RL and SFT updates share: micro-batch plans, the log-prob pass of one micro-batch, the
scaled backward, and the optimizer step that skips a non-finite gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from relift_pl.module import ReLIFTModule


def plan(
    module: ReLIFTModule,
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    prompt_width: int,
    rows: Sequence[int],
    max_seqs: int,
) -> list[MicroBatch]:
    """Micro-batches of ``rows``; every rank gets the same count (collectives must match)."""
    micro = plan_micro_batches(
        prompt_lengths, response_lengths, prompt_width, rows, max_seqs,
        module.algo.max_tokens_per_micro_batch,
    )  # fmt: skip
    count = int(all_reduce_max(torch.tensor(float(len(micro)), device=module.device, dtype=torch.float32)))
    return pad_plan(micro, count)


def budget_group_tokens(
    module: ReLIFTModule,
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    rows: Sequence[int],
    max_tokens: int,
    shards: int = 1,
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
    out = torch.zeros(len(prompt_lengths), device=module.device)  # [N]
    out[torch.tensor(rows, device=module.device)] = torch.tensor(sizes, device=module.device, dtype=out.dtype)
    return out


def global_width(module: ReLIFTModule, width: int) -> float:
    """The widest response block over ranks: the "constant" loss normaliser when none is set."""
    return float(all_reduce_max(torch.tensor(float(width), device=module.device, dtype=torch.float32)))


def micro_logprobs(
    module: ReLIFTModule, model, micro: MicroBatch, input_ids: Tensor, attention_mask: Tensor,
    prompt_width: int, temperature: float = 1.0, with_entropy: bool = True,
    entropy_grad: bool = True, share_prompts: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """[m, r] log-probs (and entropies) of one micro-batch's response tokens, trimmed columns."""
    columns = micro.columns(prompt_width)
    return policy_logprobs(
        model, input_ids[micro.rows][:, columns], attention_mask[micro.rows][:, columns],
        micro.response_len, temperature=temperature, with_entropy=with_entropy,
        entropy_grad=entropy_grad, token_chunk=module.algo.logprob_token_chunk,
        # Each prompt's G samples: the prompt runs once (not under FSDP2: one forward per
        # micro-batch is what its hooks are tested with).
        share_prompts=share_prompts and module.algo.share_prompt_prefix and not module.sharded,
    )  # fmt: skip


def backward(module: ReLIFTModule, loss: Tensor, weight: float, last: bool) -> None:
    """Accumulates ``weight`` x the gradient of ``loss``.

    DDP and FSDP2 average gradients over ranks; losses are normalised by global counts, so scaling
    by the world size turns that average into the sum the loss defines. Under FSDP2 gradients
    are reduce-scattered only on the ``last`` backward before an optimizer step
    (``algorithm.defer_grad_sync``): one collective per optimizer step instead of one per
    micro-batch, at the cost of full-size unsharded gradients meanwhile.
    """
    if module.sharded and module.algo.defer_grad_sync:
        module.policy.set_requires_gradient_sync(last)
    module.manual_backward(loss * (weight * world_size_and_rank()[0]))


def optimizer_step(module: ReLIFTModule, optimizer, max_norm: float, name: str) -> Tensor:
    """Clips, then steps unless the grad norm is not finite (that step is skipped and counted).

    Returns:
        The grad norm before clipping (a 0-dim tensor, the same on every rank).
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(module.policy.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    # The one host read of an optimizer step: skipping must be decided on every rank alike.
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        module.skipped_steps += 1
        skips = module.consecutive_skips[name] = module.consecutive_skips.get(name, 0) + 1
        if skips >= module.algo.max_consecutive_skips:
            raise FloatingPointError(
                f"{skips} consecutive {name} optimizer steps had a non-finite grad norm (last "
                f"at training step {module.step_count + 1}); stopping. Lower the learning rate or "
                "check the data (see algorithm.max_consecutive_skips)."
            )
        return grad_norm.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    module.consecutive_skips[name] = 0
    module.weights_version += 1
    return grad_norm.detach()


def move_optimizer_state(optimizer, device: torch.device | str) -> None:
    """Moves optimizer moments (the SFT AdamW's, between its rare steps) to ``device``."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Lightning wraps optimizers
    for state in inner.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                # Host-to-device may overlap; device-to-host must not (the CPU copy is read later).
                state[key] = value.to(device, non_blocking=torch.device(device).type != "cpu")
