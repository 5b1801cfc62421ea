"""The rollout engine vs the trainer: how far their log-probs of the sampled tokens differ.

A colocated engine (vLLM) samples with its own copy of the weights and its own kernels, so its
log-probs differ from the trainer's even right after a weight sync (numerics), and by a lot when
the sync is stale or broken. Two uses:
- verification: |engine - trainer| on the sampled tokens, logged every step and optionally bounded;
- truncated importance sampling (TIS): token weights exp(trainer - engine) capped at C correct the
  policy gradient for sampling from the engine's slightly different distribution (Yao et al. 2025,
  "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
  fengyao.notion.site/off-policy-rl). The ReLIFT reference has none, so it is off by default.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def logprob_diff(trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> Tensor:
    """|trainer - engine| per token, 0 off the mask.

    Args:
        trainer_logprobs: [N, T] the trainer's log-probs of the sampled tokens (same temperature).
        engine_logprobs: [N, T] the engine's log-probs of the same tokens.
        mask: [N, T] 1 on response tokens.

    Returns:
        [N, T] non-negative differences (masked positions are 0, whatever they held).
    """
    diff = (trainer_logprobs.detach().float() - engine_logprobs.float()).abs()  # [N, T]
    return diff.masked_fill(mask == 0, 0.0)


def truncated_is_weights(
    trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float
) -> Tensor:
    """min(exp(trainer - engine), cap) per token, detached; 0 off the mask.

    Args:
        trainer_logprobs: [N, T] the trainer's log-probs of the sampled tokens before the update
            (the "old" policy of the PG ratio).
        engine_logprobs: [N, T] the engine's (behaviour policy's) log-probs of the same tokens.
        mask: [N, T] 1 on response tokens.
        cap: C > 0, the largest weight.

    Returns:
        [N, T] float32 weights in (0, cap].
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    log_ratio = (trainer_logprobs.detach().float() - engine_logprobs.float()).masked_fill(
        mask == 0, 0.0
    )  # [N, T]
    # Clamping the exponent (not the result) keeps exp() finite for any garbage input.
    weights = torch.exp(log_ratio.clamp(max=math.log(cap)))  # [N, T]
    return weights.masked_fill(mask == 0, 0.0)
