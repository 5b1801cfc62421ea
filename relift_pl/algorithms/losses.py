"""Policy-gradient (GRPO) and SFT losses, sharing one loss-aggregation function.

- Policy gradient with importance ratio exp(logp - old_logp): GRPO (Shao et al. 2024, arXiv
  2402.03300). The optional PPO clip is asymmetric, "clip-higher" from DAPO (Yu et al. 2025, arXiv
  2503.14476): 1 - 0.2 below, 1 + 0.28 above. The ReLIFT reference run turns the clip off.
- Aggregation by a constant (max response length) instead of a token mean: Dr.GRPO (Liu et al. 2025,
  arXiv 2503.20783); ReLIFT's reference default.
- KL penalty with the k3 estimator exp(d) - d - 1, d = ref_logp - logp (Schulman 2020, "Approximating
  KL Divergence", joschu.net/blog/kl-approx.html). Off by default in ReLIFT.
- SFT: token-mean NLL on the demonstration tokens minus an entropy bonus (ReLIFT, Ma et al. 2025).
- Token means per group of rows ("group_token_mean"): the ReLIFT reference takes its entropy (RL)
  and its NLL and entropy (SFT) as token means per micro-batch; a group here is such a
  micro-batch, fixed by the data, not by this project's memory-driven micro-batching.
- Policy shaping on off-policy (demonstration) tokens: LUFFY (Yan et al. 2025, arXiv 2504.14945)
  replaces the ratio by f(pi_theta) = pi_theta / (pi_theta + gamma), unclipped, gamma = 0.1.

Deviation from the plain formulas, for numerical safety only: the log-ratio and the k3 log-difference
are clamped to [-20, 20] (as verl does), so a garbage padding token cannot make exp() overflow into a
NaN gradient.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from relift_pl.algorithms.aggregation import (
    AggMode,
    Count,
    aggregate_loss,
    check_agg_mode,
    masked_mean,
)

_LOG_CLAMP = 20.0


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 KL estimate of KL(policy || ref): exp(d) - d - 1 with d = ref - logp, >= 0.

    Args:
        logprobs: [N, T] policy log-probs of the sampled tokens.
        ref_logprobs: [N, T] reference-model log-probs of the same tokens.

    Returns:
        [N, T] non-negative estimates (unbiased for samples drawn from the policy).
    """
    diff = (ref_logprobs - logprobs).clamp(-_LOG_CLAMP, _LOG_CLAMP)  # [N, T]
    return torch.exp(diff) - diff - 1.0


def policy_shaping(logprobs: Tensor, gamma: float | None) -> Tensor:
    """LUFFY's regularised importance weight of off-policy tokens: f(p) = p / (p + gamma).

    p = pi_theta(token) = exp(logprobs), with gradient; the demonstrator's probability is taken
    as 1 and no old (behaviour) log-prob enters (LUFFY's ``compute_token_on_off_policy_loss``:
    ``off_ratio = exp(log_prob)``, reshaped ``p_div_p_0.1``). The gradient of -A f(p) is
    -A gamma p / (p + gamma)^2 * grad log p: tokens the policy finds unlikely (p ~ gamma) weigh
    most, instead of p * grad log p (plain IS, which ignores them) or grad log p (SFT).

    Args:
        logprobs: [N, T] current policy log-probs of the demonstration tokens (with grad).
        gamma: the regulariser (LUFFY: 0.1); None: f(p) = p, LUFFY's ablation without shaping.

    Returns:
        [N, T] f(p) in [0, 1 / (1 + gamma)].
    """
    probs = logprobs.exp()  # [N, T]
    return probs if gamma is None else probs / (probs + gamma)


def shaping_weight(logprobs: Tensor, gamma: float | None) -> Tensor:
    """The weight policy shaping puts on a token's log-probability gradient: d f(p) / d log p =
    gamma p / (p + gamma)^2 (p without shaping; SFT's is 1). At p << gamma it is about p / gamma:
    a demonstration token the policy gives 1e-7 is pushed with weight ~1e-6.

    Args:
        logprobs: [N, T] log-probs.
        gamma: the shaping regulariser; None: no shaping (f(p) = p, weight p).
    """
    probs = logprobs.exp()  # [N, T]
    return probs if gamma is None else gamma * probs / (probs + gamma) ** 2


def _check_non_negative(**kwargs: float) -> None:
    for name, value in kwargs.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _check_loss_constant(loss_constant: float | None) -> None:
    if loss_constant is not None and loss_constant <= 0:
        raise ValueError(f"loss_constant must be > 0, got {loss_constant}")


def _check_groups(mode: str | None, **size: int | None) -> None:
    """A group_token_mean mode needs its group size (a token budget or a row count) and > 0."""
    (name, value), = size.items()
    if mode == "group_token_mean" and (value is None or value < 1):
        raise ValueError(f"{name} must be >= 1 with group_token_mean, got {value}")


class PolicyGradientLoss(nn.Module):
    """GRPO policy-gradient loss with optional DAPO clip-higher, entropy bonus and k3 KL penalty.

    loss = agg(pg) - entropy_coef * agg(entropy) + kl_coef * agg(kl_k3(logp, ref_logp)), where
    pg = -A * ratio, or with the clip max(-A * ratio, -A * clamp(ratio, 1 - low, 1 + high)).
    On the rows marked ``off_policy`` (LUFFY's demonstrations) pg = -A * policy_shaping(logp),
    never clipped and never IS-weighted; one aggregation covers both kinds of tokens, as in
    LUFFY.

    Args:
        clip: apply the PPO clip (the ReLIFT reference run does not).
        clip_ratio_low: lower clip epsilon (ratio floor 1 - low).
        clip_ratio_high: upper clip epsilon (ratio ceiling 1 + high), DAPO clip-higher.
        agg_mode: how token losses are reduced, see `aggregate_loss`.
        loss_constant: normaliser for agg_mode "constant" (max response length); None -> T.
        entropy_coef: weight of the entropy bonus.
        kl_coef: weight of the k3 KL penalty to the reference model.
        shaping_gamma: gamma of the policy shaping on off-policy tokens (LUFFY: 0.1); None:
            f(p) = p (no shaping).
        entropy_agg_mode: how the entropy bonus is reduced; None: like the pg term (agg_mode).
            "group_token_mean": a token mean per group of rows (at most
            ``entropy_group_max_tokens`` prompt + response tokens each, like a token-budget
            micro-batch), summed over the groups and divided by the sequence count like the pg
            term: the ReLIFT reference adds each micro-batch's entropy token mean to a pg term
            summed over sequences, so its entropy weighs per micro-batch, not per token.
        entropy_group_max_tokens: the token budget of those groups (group_token_mean).
        entropy_group_shards: the group count is a multiple of this: shards x ceil(mini-batch
            tokens / shards / budget), the groups formed over the whole mini-batch whatever the
            world size. The reference's GPU count gives its count when its re-deal by length
            leaves each GPU an equal share (1: the fewest groups the budget allows).
    """

    def __init__(
        self,
        clip: bool = False,
        clip_ratio_low: float = 0.2,
        clip_ratio_high: float = 0.28,
        agg_mode: AggMode = "constant",
        loss_constant: float | None = None,
        entropy_coef: float = 0.0,
        kl_coef: float = 0.0,
        shaping_gamma: float | None = 0.1,
        entropy_agg_mode: AggMode | None = None,
        entropy_group_max_tokens: int | None = None,
        entropy_group_shards: int = 1,
    ) -> None:
        super().__init__()
        if shaping_gamma is not None and not shaping_gamma > 0:
            raise ValueError(f"shaping_gamma must be > 0 or null, got {shaping_gamma}")
        _check_non_negative(
            clip_ratio_low=clip_ratio_low,
            clip_ratio_high=clip_ratio_high,
            entropy_coef=entropy_coef,
            kl_coef=kl_coef,
        )
        _check_loss_constant(loss_constant)
        check_agg_mode(agg_mode)
        if agg_mode == "group_token_mean":
            raise ValueError("agg_mode group_token_mean is for the entropy term only "
                             "(entropy_agg_mode); the pg term's groups would be arbitrary")
        if entropy_agg_mode is not None:
            check_agg_mode(entropy_agg_mode)
        _check_groups(entropy_agg_mode, entropy_group_max_tokens=entropy_group_max_tokens)
        if entropy_group_shards < 1:
            raise ValueError(f"entropy_group_shards must be >= 1, got {entropy_group_shards}")
        self.clip = clip
        self.clip_ratio_low = clip_ratio_low
        self.clip_ratio_high = clip_ratio_high
        self.agg_mode = agg_mode
        self.loss_constant = loss_constant
        self.entropy_coef = entropy_coef
        self.kl_coef = kl_coef
        self.shaping_gamma = shaping_gamma
        self.entropy_agg_mode = entropy_agg_mode
        self.entropy_group_max_tokens = entropy_group_max_tokens
        self.entropy_group_shards = entropy_group_shards

    def forward(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        *,
        entropy: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        is_weights: Tensor | None = None,
        off_policy: Tensor | None = None,
        num_tokens: Count = None,
        num_seqs: Count = None,
        seq_width: float | None = None,
        group_tokens: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Computes the loss of one (micro-)batch.

        Args:
            logprobs: [N, T] current policy log-probs of the sampled tokens (with grad).
            old_logprobs: [N, T] log-probs at sampling time (no grad).
            advantages: [N] per-sequence advantages, broadcast over tokens ([N, T] also accepted).
            response_mask: [N, T] 1 on response tokens, 0 on padding.
            entropy: [N, T] policy entropy per position; needed if entropy_coef > 0.
            ref_logprobs: [N, T] reference-model log-probs; needed if kl_coef > 0.
            is_weights: [N, T] truncated importance-sampling weights (already capped); detached.
            off_policy: [N] bool, True on rows that are demonstrations (LUFFY): their tokens
                get policy shaping; ``old_logprobs`` and ``is_weights`` are ignored there.
            num_tokens: global token count for aggregation, see `aggregate_loss`.
            num_seqs: global sequence count for aggregation, see `aggregate_loss`.
            seq_width: the "constant" normaliser when ``loss_constant`` is None: pass the whole
                batch's response width (global over micro-batches and ranks), else each call
                falls back to its own width T and the loss depends on micro-batching.
            group_tokens: [N] response tokens of each row's whole group, for
                ``entropy_agg_mode`` group_token_mean.

        Returns:
            (loss, metrics). Metrics are detached scalars: "pg_loss" (the aggregated pg term, so
            micro-batch values sum to the batch value under global counts), and local token means
            "clip_frac", "ratio_mean", "entropy" (if given), "kl" (if ref_logprobs given); with
            ``off_policy``, means over the off-policy tokens: "off_policy_prob" (p) and
            "shaped_prob" (f(p)); and over the demonstration rows, sums for a mean over rows:
            "off_rows", "min_token_logprob_sum" (each row's least likely token's log-prob) and
            "min_token_weight_sum" (its ``shaping_weight``).
        """
        if self.entropy_coef > 0 and entropy is None:
            raise ValueError("entropy_coef > 0 but no entropy was passed")
        if self.kl_coef > 0 and ref_logprobs is None:
            raise ValueError("kl_coef > 0 but no ref_logprobs were passed")

        agg = functools.partial(
            aggregate_loss, mask=response_mask, mode=self.agg_mode, num_tokens=num_tokens,
            num_seqs=num_seqs,
            constant=self.loss_constant if self.loss_constant is not None else seq_width,
        )  # fmt: skip

        ratio = torch.exp((logprobs - old_logprobs).clamp(-_LOG_CLAMP, _LOG_CLAMP))  # [N, T]
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [N, 1]
        pg = -adv * ratio  # [N, T]
        clipped = torch.zeros_like(pg, dtype=torch.bool)  # [N, T]
        if self.clip:
            bounded = ratio.clamp(1.0 - self.clip_ratio_low, 1.0 + self.clip_ratio_high)
            pg_clipped = -adv * bounded  # [N, T]
            clipped = pg_clipped > pg
            pg = torch.maximum(pg, pg_clipped)
        if is_weights is not None:
            pg = pg * is_weights.detach()
        shaped_metrics = {}
        if off_policy is not None:
            off_tokens = off_policy.bool().unsqueeze(-1).expand_as(pg)  # [N, T]
            shaped = policy_shaping(logprobs, self.shaping_gamma)  # [N, T]
            pg = torch.where(off_tokens, -adv * shaped, pg)  # no clip on demonstration tokens
            clipped = clipped & ~off_tokens
            off_mask = response_mask * off_tokens
            # Each demonstration's least likely token: the decision the policy must still learn.
            least = logprobs.detach().masked_fill(off_mask == 0, float("inf")).min(-1).values  # [N]
            off_rows = off_policy.bool() & torch.isfinite(least)  # [N]
            least = torch.where(off_rows, least, torch.zeros_like(least))
            shaped_metrics = {
                "off_policy_prob": masked_mean(logprobs.detach().exp(), off_mask),
                "shaped_prob": masked_mean(shaped.detach(), off_mask),
                "off_rows": off_rows.sum().float(),
                "min_token_logprob_sum": least[off_rows].sum(),
                "min_token_weight_sum": shaping_weight(least[off_rows], self.shaping_gamma).sum(),
            }

        pg_loss = agg(pg)
        loss = pg_loss
        metrics = {
            "pg_loss": pg_loss.detach(),
            "clip_frac": masked_mean(clipped.float(), response_mask),
            "ratio_mean": masked_mean(ratio.detach(), response_mask),
            **shaped_metrics,
        }
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.detach(), response_mask)
            if self.entropy_coef != 0:
                entropy_agg = agg
                if self.entropy_agg_mode is not None:
                    # Groups summed, then per sequence like the pg term: num_groups is N.
                    per_seq = num_seqs if num_seqs is not None else max(response_mask.shape[0], 1)
                    entropy_agg = functools.partial(
                        agg, mode=self.entropy_agg_mode, group_tokens=group_tokens,
                        num_groups=per_seq,
                    )  # fmt: skip
                loss = loss - self.entropy_coef * entropy_agg(entropy)
        if ref_logprobs is not None:
            kl = kl_k3(logprobs, ref_logprobs)  # [N, T]
            metrics["kl"] = masked_mean(kl.detach(), response_mask)
            if self.kl_coef != 0:
                loss = loss + self.kl_coef * agg(kl)
        return loss, metrics


class SFTLoss(nn.Module):
    """NLL on demonstration tokens minus an entropy bonus: agg(-logp) - entropy_coef * agg(H).

    Args:
        entropy_coef: weight of the entropy bonus.
        agg_mode: how token losses are reduced, see `aggregate_loss` (ReLIFT: token_mean).
            group_token_mean: the mean over groups of ``group_rows`` consecutive demonstrations
            of each group's token mean (the ReLIFT reference's micro-batches of 4: long and
            short demonstrations weigh by their group, not by their tokens).
        loss_constant: normaliser for agg_mode "constant"; None -> T.
        group_rows: demonstrations per group (group_token_mean).
    """

    def __init__(
        self,
        entropy_coef: float = 0.0,
        agg_mode: AggMode = "token_mean",
        loss_constant: float | None = None,
        group_rows: int | None = None,
    ) -> None:
        super().__init__()
        _check_non_negative(entropy_coef=entropy_coef)
        _check_loss_constant(loss_constant)
        check_agg_mode(agg_mode)
        _check_groups(agg_mode, group_rows=group_rows)
        self.entropy_coef = entropy_coef
        self.agg_mode = agg_mode
        self.loss_constant = loss_constant
        self.group_rows = group_rows

    def forward(
        self,
        logprobs: Tensor,
        loss_mask: Tensor,
        *,
        entropy: Tensor | None = None,
        num_tokens: Count = None,
        num_seqs: Count = None,
        seq_width: float | None = None,
        group_tokens: Tensor | None = None,
        num_groups: Count = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Computes the SFT loss of one (micro-)batch.

        Args:
            logprobs: [N, T] policy log-probs of the demonstration tokens (with grad).
            loss_mask: [N, T] 1 on demonstration tokens, 0 on prompt and padding.
            entropy: [N, T] policy entropy per position; needed if entropy_coef > 0.
            num_tokens: global token count for aggregation, see `aggregate_loss`.
            num_seqs: global sequence count for aggregation, see `aggregate_loss`.
            seq_width: the "constant" normaliser when ``loss_constant`` is None (see
                `PolicyGradientLoss.forward`).
            group_tokens: [N] demonstration tokens of each row's whole group (group_token_mean).
            num_groups: global number of groups (group_token_mean).

        Returns:
            (loss, metrics): "nll" (the aggregated NLL term) and "entropy" (local token mean, if
            given), detached scalars.
        """
        if self.entropy_coef > 0 and entropy is None:
            raise ValueError("entropy_coef > 0 but no entropy was passed")

        agg = functools.partial(
            aggregate_loss, mask=loss_mask, mode=self.agg_mode, num_tokens=num_tokens,
            num_seqs=num_seqs,
            constant=self.loss_constant if self.loss_constant is not None else seq_width,
            group_tokens=group_tokens, num_groups=num_groups,
        )  # fmt: skip

        nll = agg(-logprobs)
        loss = nll
        metrics = {"nll": nll.detach()}
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.detach(), loss_mask)
            if self.entropy_coef != 0:
                loss = loss - self.entropy_coef * agg(entropy)
        return loss, metrics
