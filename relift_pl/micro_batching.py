"""Splitting a batch of [left-padded prompt | right-padded response] rows into micro-batches.

Pure bookkeeping, no model: which rows go together, and which columns they need. A
micro-batch keeps only the columns some of its rows use, so short rows grouped together cost
short forward passes (sorting by length first cuts padding further).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MicroBatch:
    rows: Tensor  # [m] indices into the batch
    start: int  # first column kept (leading columns that are padding in every row are cut)
    response_len: int  # response columns kept (trailing all-padding columns are cut)
    weight: float = 1.0  # 0 for filler micro-batches that only keep ranks in step

    def columns(self, prompt_len: int) -> slice:
        return slice(self.start, prompt_len + self.response_len)


def plan_micro_batches(
    attention_mask: Tensor,
    prompt_len: int,
    rows: Tensor,
    max_seqs: int,
    max_tokens: int | None = None,
) -> list[MicroBatch]:
    """Groups ``rows`` into micro-batches.

    Args:
        attention_mask: [N, P + R] 1 on real prompt and response tokens.
        prompt_len: P, the width of the left-padded prompt block.
        rows: indices of the rows to split (one mini-batch).
        max_seqs: most rows per micro-batch.
        max_tokens: token budget per micro-batch, counted as rows x longest row (the padded
            cost of the forward pass). When set, rows are sorted by length so similar lengths
            share a micro-batch. A single row longer than the budget still gets its own.

    Returns:
        Micro-batches covering every row of ``rows`` exactly once.
    """
    lengths = attention_mask[rows].sum(-1)  # [n] real tokens per row
    order = rows if max_tokens is None else rows[torch.argsort(lengths, descending=True, stable=True)]
    groups: list[list[int]] = [[]]
    longest = 0
    for row in order.tolist():
        length = int(attention_mask[row].sum())
        fits_count = len(groups[-1]) < max_seqs
        fits_tokens = max_tokens is None or (len(groups[-1]) + 1) * max(longest, length) <= max_tokens
        if groups[-1] and not (fits_count and fits_tokens):
            groups.append([])
            longest = 0
        groups[-1].append(row)
        longest = max(longest, length)
    return [_trimmed(attention_mask, prompt_len, torch.tensor(g)) for g in groups if g]


def _trimmed(attention_mask: Tensor, prompt_len: int, rows: Tensor) -> MicroBatch:
    mask = attention_mask[rows]  # [m, P + R]
    prompt_used = mask[:, :prompt_len].any(dim=0).nonzero()
    start = int(prompt_used[0]) if len(prompt_used) else prompt_len - 1
    start = min(start, prompt_len - 1)  # keep >= 1 prompt column: it predicts the first token
    response_len = max(int(mask[:, prompt_len:].sum(-1).max()), 1)
    return MicroBatch(rows=rows, start=start, response_len=response_len)


def pad_plan(plan: list[MicroBatch], count: int) -> list[MicroBatch]:
    """Appends zero-weight copies of the last micro-batch up to ``count``, so every rank runs the
    same number of forward/backward passes (FSDP and DDP collectives must match)."""
    filler = MicroBatch(plan[-1].rows[:1], plan[-1].start, plan[-1].response_len, weight=0.0)
    return plan + [filler] * (count - len(plan))
