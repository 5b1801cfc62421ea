"""Rewards: answer extraction and math-verify grading in worker processes."""

from relift_pl.rewards.extract import (
    extract_choice_letter,
    last_boxed,
    normalize_answer,
    split_think,
)
from relift_pl.rewards.verifier import MathVerifyReward, RewardOutput

__all__ = [
    "MathVerifyReward",
    "RewardOutput",
    "extract_choice_letter",
    "last_boxed",
    "normalize_answer",
    "split_think",
]
