"""Group-relative advantages (GRPO).

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300) replaces the learned critic by a group
baseline: each prompt is sampled G times and every sample is scored against the mean reward of its
own group. Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783) drops
the division by the group standard deviation because it up-weights questions that are almost always
solved or almost never solved; the ReLIFT reference code follows Dr.GRPO, so `scale_by_std` is off by
default and kept as a knob.
"""

from __future__ import annotations

from torch import Tensor


def group_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = False, eps: float = 1e-6
) -> Tensor:
    """Subtracts each group's mean reward (and optionally divides by its standard deviation).

    A_i = r_i - mean(r_group); with `scale_by_std`, A_i / (std(r_group) + eps). The standard
    deviation is the unbiased one (Bessel's correction, `torch.std` default), as in verl's GRPO
    estimator that the ReLIFT reference builds on. A group of size 1 has no spread: its advantage is
    0 and the division is skipped.

    Args:
        rewards: [B*G] scalar reward per sample, laid out prompt-major (the G samples of one prompt
            are contiguous).
        group_size: G, the number of samples per prompt.
        scale_by_std: divide by the group's standard deviation (original GRPO) instead of only
            centring (Dr.GRPO, ReLIFT reference).
        eps: added to the standard deviation so all-equal groups give 0, not NaN.

    Returns:
        [B*G] float advantages, same layout as `rewards`. No gradient flows to `rewards`.

    Raises:
        ValueError: if `group_size` < 1, `rewards` is not 1-D, or its length is not a multiple of
            `group_size`.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} elements, not divisible by group_size={group_size}; "
            "expected the G samples of every prompt to be contiguous"
        )
    grouped = rewards.detach().float().view(-1, group_size)  # [B, G]
    advantages = grouped - grouped.mean(dim=-1, keepdim=True)  # [B, G]
    if scale_by_std and group_size > 1:
        advantages = advantages / (grouped.std(dim=-1, keepdim=True) + eps)  # [B, G]
    return advantages.view(-1)  # [B*G]
