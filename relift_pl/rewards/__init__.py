"""Rewards: answer extraction and math-verify grading in worker processes.

The grader (``MathVerifyReward``, ``RewardOutput``) is imported on first use: the data package
needs the extraction helpers only, and machines without math-verify (the GPU smoke image) can
still build prompts and train.
"""

from relift_pl.rewards.extract import (
    extract_choice_letter,
    last_boxed,
    normalize_answer,
    split_think,
)

__all__ = [
    "MathVerifyReward",
    "RewardOutput",
    "extract_choice_letter",
    "last_boxed",
    "normalize_answer",
    "split_think",
]


def __getattr__(name: str):
    if name in ("MathVerifyReward", "RewardOutput"):
        from relift_pl.rewards import verifier

        return getattr(verifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
