"""Splitting a batch of [left-padded prompt | right-padded response] rows into micro-batches.

Pure bookkeeping over row lengths (plain Python ints, read once from the CPU masks): no model,
no device tensors, so planning never waits on a GPU and never mixes devices. A micro-batch keeps
only the columns some of its rows use, so short rows grouped together cost short forward passes
(sorting by length first cuts padding further).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MicroBatch:
    rows: Tensor  # [m] CPU indices into the batch
    start: int  # first column kept (leading columns that are padding in every row are cut)
    response_len: int  # response columns kept (trailing all-padding columns are cut)
    weight: float = 1.0  # 0 for filler micro-batches that only keep ranks in step

    def columns(self, prompt_width: int) -> slice:
        return slice(self.start, prompt_width + self.response_len)

    def width(self, prompt_width: int) -> int:
        """Columns the forward pass runs: the longest prompt plus the longest response."""
        return prompt_width - self.start + self.response_len


def row_lengths(prompt_mask: Tensor, response_mask: Tensor) -> tuple[list[int], list[int]]:
    """Real prompt and response tokens per row, as Python ints (one transfer each).

    Args:
        prompt_mask: [N, P] 1 on real prompt tokens (left-padded).
        response_mask: [N, R] 1 on real response tokens (right-padded).
    """
    return prompt_mask.sum(-1).tolist(), response_mask.sum(-1).tolist()


def plan_micro_batches(
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    prompt_width: int,
    rows: Sequence[int],
    max_seqs: int,
    max_tokens: int | None = None,
) -> list[MicroBatch]:
    """Groups ``rows`` into micro-batches.

    Args:
        prompt_lengths: real prompt tokens of every row of the batch.
        response_lengths: real response tokens of every row of the batch.
        prompt_width: P, the width of the left-padded prompt block.
        rows: indices of the rows to split (one mini-batch).
        max_seqs: most rows per micro-batch.
        max_tokens: token budget per micro-batch, counted as the forward pass runs it: rows x
            (longest prompt + longest response) of the micro-batch. When set, rows are sorted by
            length so similar lengths share a micro-batch. A single row longer than the budget
            still gets its own.

    Returns:
        Micro-batches covering every row of ``rows`` exactly once.
    """
    order = list(rows)
    if max_tokens is not None:
        total = {row: prompt_lengths[row] + response_lengths[row] for row in order}
        order.sort(key=lambda row: -total[row])  # stable: ties keep their order
    groups: list[list[int]] = [[]]
    longest_prompt = longest_response = 0
    for row in order:
        prompt, response = prompt_lengths[row], response_lengths[row]
        cost = (len(groups[-1]) + 1) * (max(longest_prompt, prompt) + max(longest_response, response))
        fits = len(groups[-1]) < max_seqs and (max_tokens is None or cost <= max_tokens)
        if groups[-1] and not fits:
            groups.append([])
            longest_prompt = longest_response = 0
        groups[-1].append(row)
        longest_prompt = max(longest_prompt, prompt)
        longest_response = max(longest_response, response)
    return [
        _trimmed(prompt_lengths, response_lengths, prompt_width, group) for group in groups if group
    ]


def _trimmed(
    prompt_lengths: Sequence[int], response_lengths: Sequence[int], prompt_width: int, group: list[int]
) -> MicroBatch:
    longest_prompt = max(prompt_lengths[row] for row in group)
    # Keep >= 1 prompt column: it predicts the first response token.
    start = min(prompt_width - longest_prompt, prompt_width - 1)
    response_len = max(max(response_lengths[row] for row in group), 1)
    return MicroBatch(rows=torch.tensor(group), start=start, response_len=response_len)


def pad_plan(plan: list[MicroBatch], count: int) -> list[MicroBatch]:
    """Appends zero-weight copies of the last micro-batch up to ``count``, so every rank runs the
    same number of forward/backward passes (FSDP and DDP collectives must match)."""
    if not plan:
        raise ValueError("pad_plan needs at least one micro-batch to copy (a rank with no rows "
                         "must plan one zero-weight row)")
    filler = MicroBatch(plan[-1].rows[:1], plan[-1].start, plan[-1].response_len, weight=0.0)
    return plan + [filler] * (count - len(plan))


def token_budget_groups(costs: Sequence[int], max_tokens: int, count: int | None = None) -> list[list[int]]:
    """Splits rows into ``count`` groups of near-equal token cost (default: as few as the budget
    allows, ceil(total / max_tokens)); the groups of a ``group_token_mean`` loss term.

    The ReLIFT reference forms its micro-batches this way (that many, balanced by tokens) and takes
    a token mean per micro-batch; it balances with Karmarkar-Karp, this with the greedy "largest
    first into the lightest group" rule: the same count, near the same balance. Independent of
    this project's own micro-batches, which follow memory (padded cost, sorted rows).

    Args:
        costs: tokens of each row (prompt + response, unpadded).
        max_tokens: the token budget of a group.
        count: the number of groups to form (e.g. :func:`min_group_count` with shards); None:
            ceil(total / max_tokens). Capped at the row count.

    Returns:
        Groups of positions into ``costs``, each non-empty and in ascending order.
    """
    if count is None:
        count = min_group_count(costs, max_tokens)
    count = max(1, min(count, len(costs)))
    groups: list[list[int]] = [[] for _ in range(count)]
    lightest = [(0, g) for g in range(count)]  # (tokens, group): a heap, ties to the lower group
    for row in sorted(range(len(costs)), key=lambda row: -costs[row]):  # stable on ties
        total, group = heapq.heappop(lightest)
        groups[group].append(row)
        heapq.heappush(lightest, (total + costs[row], group))
    return [sorted(group) for group in groups]


def min_group_count(costs: Sequence[int], max_tokens: int, shards: int = 1) -> int:
    """The fewest groups within the budget on average, a multiple of ``shards``: shards x
    ceil(total tokens / shards / budget), at least ``shards``.

    With ``shards`` = the ReLIFT reference's GPU count this is its micro-batch count when its
    re-deal by length (the trainer's ``_balance_batch``) gives every GPU an equal share: each
    forms ceil(share / budget) micro-batches.
    """
    return shards * max(1, -(-sum(costs) // (shards * max_tokens)))


def group_sizes(groups: Sequence[Sequence[int]], sizes: Sequence[int]) -> list[int]:
    """For every position of ``sizes``, the total size of the group that holds it.

    Args:
        groups: a partition of ``range(len(sizes))``.
        sizes: e.g. each row's response tokens.
    """
    totals = [0] * len(sizes)
    for group in groups:
        total = sum(sizes[row] for row in group)
        for row in group:
            totals[row] = total
    return totals
