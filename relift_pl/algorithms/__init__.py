"""Pure tensor math of ReLIFT: GRPO advantages, policy-gradient and SFT losses, token log-probs."""

from relift_pl.algorithms.advantages import group_advantages
from relift_pl.algorithms.aggregation import AggMode, aggregate_loss, masked_mean
from relift_pl.algorithms.fused_head import fused_logprobs_entropy
from relift_pl.algorithms.logprobs import (
    entropy_from_logits,
    logprobs_and_entropy,
    logprobs_from_logits,
    policy_logprobs,
)
from relift_pl.algorithms.losses import PolicyGradientLoss, SFTLoss, kl_k3, policy_shaping

__all__ = [
    "AggMode",
    "PolicyGradientLoss",
    "SFTLoss",
    "aggregate_loss",
    "entropy_from_logits",
    "fused_logprobs_entropy",
    "group_advantages",
    "kl_k3",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "masked_mean",
    "policy_logprobs",
    "policy_shaping",
]
