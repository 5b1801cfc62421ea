"""The one loss aggregation every loss here uses (verl's ``agg_loss``): token means, sequence
means, a constant normaliser (Dr.GRPO) or token means per group of rows, each over GLOBAL counts
so a loss does not depend on micro-batching or the world size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor

AggMode = Literal["token_mean", "seq_mean_token_mean", "constant", "group_token_mean"]
Count = float | Tensor | None

# Each reducer gets (masked values [N, T], float mask [N, T], num_tokens, num_seqs, constant,
# group_tokens [N], num_groups).
_AGGREGATORS: dict[str, Callable[..., Tensor]] = {
    "token_mean": lambda masked, mask, n_tok, n_seq, c, g_tok, n_grp: masked.sum() / n_tok,
    "seq_mean_token_mean": lambda masked, mask, n_tok, n_seq, c, g_tok, n_grp: (
        (masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).sum() / n_seq
    ),
    "constant": lambda masked, mask, n_tok, n_seq, c, g_tok, n_grp: masked.sum() / (n_seq * c),
    # A row's share of its group's token mean; summed, the groups' token means.
    "group_token_mean": lambda masked, mask, n_tok, n_seq, c, g_tok, n_grp: (
        (masked.sum(dim=-1) / g_tok.clamp(min=1)).sum() / n_grp
    ),
}


def check_agg_mode(agg_mode: str) -> None:
    if agg_mode not in _AGGREGATORS:
        raise ValueError(f"agg_mode must be one of {sorted(_AGGREGATORS)}, got {agg_mode!r}")


def aggregate_loss(
    values: Tensor,
    mask: Tensor,
    mode: AggMode,
    *,
    num_tokens: Count = None,
    num_seqs: Count = None,
    constant: float | None = None,
    group_tokens: Tensor | None = None,
    num_groups: Count = None,
) -> Tensor:
    """Reduces per-token values to one scalar; the one aggregation used by every loss here.

    - token_mean: sum(values * mask) / num_tokens (default mask.sum()).
    - seq_mean_token_mean: sum_i(sum_t(values * mask)_i / len_i) / num_seqs (default N),
      len_i = mask row sum clamped to >= 1.
    - constant: sum(values * mask) / (num_seqs * constant) (default N and T).
    - group_token_mean: sum_i(sum_t(values * mask)_i / group_tokens_i) / num_groups: the mean
      over groups of rows of each group's token mean (group_tokens_i: the masked tokens of row
      i's group). One row per group is seq_mean_token_mean; one group of all rows, token_mean.

    Pass GLOBAL counts (whole batch, all micro-batches, all ranks) and the sum of the per-micro-batch
    results equals the whole-batch value: the loss then does not depend on micro-batching or world
    size. With the defaults each call is normalised by its own counts.

    Args:
        values: [N, T] per-token values.
        mask: [N, T] 0/1 (or bool) mask; masked positions are zeroed, not multiplied, so a NaN or
            inf there cannot leak into the sum.
        mode: one of "token_mean", "seq_mean_token_mean", "constant".
        num_tokens: global number of masked tokens (token_mean).
        num_seqs: global number of sequences (seq_mean_token_mean, constant).
        constant: the normaliser per sequence for "constant", e.g. the max response length.
        group_tokens: [N] masked tokens of each row's whole group (group_token_mean; required).
        num_groups: global number of groups (group_token_mean); default: the groups whose rows
            are all here, sum_i(len_i / group_tokens_i).

    Returns:
        Scalar tensor.
    """
    check_agg_mode(mode)
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    if constant is not None and constant <= 0:
        raise ValueError(f"constant must be > 0, got {constant}")
    mask = mask.float()  # [N, T]; float32 counts even for bf16 values
    masked = values.masked_fill(mask == 0, 0.0)  # [N, T]
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1)
    if num_seqs is None:
        num_seqs = max(mask.shape[0], 1)
    if constant is None:
        constant = mask.shape[1]
    if mode == "group_token_mean":
        if group_tokens is None:
            raise ValueError("agg_mode group_token_mean needs group_tokens (each row's group size)")
        group_tokens = group_tokens.to(mask)  # [N]
        if num_groups is None:
            num_groups = (mask.sum(dim=-1) / group_tokens.clamp(min=1)).sum().clamp(min=1)
    return _AGGREGATORS[mode](masked, mask, num_tokens, num_seqs, constant, group_tokens, num_groups)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Token mean of `values` [N, T] over `mask` [N, T] (local to this call; for metrics)."""
    return values.masked_fill(mask == 0, 0.0).sum() / mask.sum().clamp(min=1)
