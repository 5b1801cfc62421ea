"""LUFFY's mixed-policy groups: a prompt's demonstration takes the place of one of its G rollouts.

LUFFY (Yan et al. 2025, "Learning to Reason under Off-Policy Guidance", arXiv 2504.14945) trains
GRPO on groups of G-1 on-policy samples plus 1 off-policy demonstration; the demonstration is
rewarded like any response and advantages are taken over the mixed group (its reference run:
``algorithm.adv_estimator=grpo``, no std). Its tokens get policy shaping instead of the PPO ratio
(:func:`relift_pl.algorithms.losses.policy_shaping`).

What this implementation decides, and why:
- Position: the demonstration replaces the LAST sample of its group. LUFFY's code puts it first
  (``n_prefix=1``); the position changes nothing in the math (advantages are symmetric in the
  group), and the last keeps a group's first row an own sample (sample logs show row 0).
- The replaced sample is generated and dropped: engines sample the same ``n`` for every prompt.
  LUFFY's engine also decodes one sequence per demonstration (a continuation after its EOS,
  masked), so the cost matches.
- A prompt without a demonstration keeps its G samples (LUFFY: an empty target is an empty
  prefix, so that row is sampled as usual).
- A demonstration longer than ``max_new_tokens`` is skipped (the group keeps its G samples) and
  counted. LUFFY's data drops traces over 8192 tokens up front (``Openr1-Math-46k-8192``); one
  cut to fit would lose its final answer and its EOS.
- The engine's log-probs of a demonstration row are 0 (no engine sampled it): the update leaves
  off-policy rows out of the engine/trainer log-prob check and out of TIS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from relift_pl.distributed import all_gather_objects
from relift_pl.metrics import StepMetrics
from relift_pl.rollout.base import RolloutBatch


def mix_demonstrations(
    rollout: RolloutBatch,
    rows: Sequence[dict[str, Any]],
    group_size: int,
    pad_id: int,
    max_new_tokens: int,
) -> tuple[RolloutBatch, list[int]]:
    """Puts each prompt's demonstration in place of the last sample of its group.

    Args:
        rollout: ``len(rows) * group_size`` sampled rows, prompt-major: prompts [N, P]
            left-padded, responses [N, R] right-padded.
        rows: the prompts, each with ``prompt_ids`` and ``demo_ids`` (ending with EOS) or none.
        group_size: G, samples per prompt.
        pad_id: written after each response.
        max_new_tokens: longest response; longer demonstrations are skipped.

    Returns:
        ``(mixed, too_long)``: the batch with ``off_policy`` [N] set (True on demonstration
        rows), responses widened to the longest demonstration if needed (padding, mask 0,
        engine log-probs 0); and the indices into ``rows`` of the prompts whose demonstration
        was too long.
    """
    n = len(rows) * group_size
    if rollout.response_ids.shape[0] != n:
        raise ValueError(
            f"rollout has {rollout.response_ids.shape[0]} rows, expected {len(rows)} prompts x "
            f"{group_size}"
        )
    mixed, too_long = {}, []  # mixed: row index -> demonstration ids
    for i, row in enumerate(rows):
        demo = row.get("demo_ids")
        if not demo:
            continue
        if len(demo) > max_new_tokens:
            too_long.append(i)
            continue
        mixed[(i + 1) * group_size - 1] = demo
    width = max([rollout.response_ids.shape[1], *map(len, mixed.values())])
    extra = width - rollout.response_ids.shape[1]
    response_ids = F.pad(rollout.response_ids, (0, extra), value=pad_id)  # [N, R']
    response_mask = F.pad(rollout.response_mask, (0, extra))  # [N, R']
    logprobs = None if rollout.logprobs is None else F.pad(rollout.logprobs, (0, extra))
    reasons = list(rollout.finish_reasons)
    off_policy = torch.zeros(n, dtype=torch.bool)  # [N]
    for index, demo in mixed.items():
        response_ids[index] = pad_id
        response_ids[index, : len(demo)] = torch.tensor(demo, dtype=response_ids.dtype)
        response_mask[index] = 0
        response_mask[index, : len(demo)] = 1
        if logprobs is not None:
            logprobs[index] = 0.0
        reasons[index] = "stop"  # the data appends EOS to every demonstration
        off_policy[index] = True
    return RolloutBatch(
        prompt_ids=rollout.prompt_ids,
        prompt_mask=rollout.prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        finish_reasons=reasons,
        logprobs=logprobs,
        off_policy=off_policy,
    ), too_long


def mix_batch_demos(
    rollout: RolloutBatch, batch: Sequence[dict[str, Any]], group_size: int, pad_id: int,
    max_new_tokens: int, metrics: StepMetrics,
) -> tuple[RolloutBatch, list[str]]:
    """A training step's LUFFY groups (:func:`mix_demonstrations`), counted in ``luffy/*``.

    Returns:
        The mixed batch and the ids of every rank's mixed demonstrations.
    """
    mixed, too_long = mix_demonstrations(rollout, batch, group_size, pad_id, max_new_tokens)
    has_demo = mixed.off_policy.view(len(batch), -1).any(-1).tolist()  # [B]
    metrics.add("luffy/demos_mixed", sum(has_demo))
    metrics.add("luffy/demos_too_long", len(too_long))
    return mixed, all_gather_objects([str(r["id"]) for r, m in zip(batch, has_demo) if m])


def off_policy_token_mask(response_mask: Tensor, off_policy: Tensor | None) -> Tensor:
    """[N, R] 1 on the response tokens of off-policy rows (all 0 when ``off_policy`` is None).

    Args:
        response_mask: [N, R] 1 on response tokens.
        off_policy: [N] bool, True on demonstration rows, or None.
    """
    if off_policy is None:
        return torch.zeros_like(response_mask)
    return response_mask * off_policy.to(response_mask.device, response_mask.dtype).unsqueeze(-1)
