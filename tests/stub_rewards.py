"""A stand-in reward for run tests: deterministic, and often 1, unlike real grading of a tiny model.

It makes scores non-trivial (not all 0), so tests can check that numbers travel unchanged from
the scoring to the logs and the results files.
"""

from __future__ import annotations

import zlib

from relift_pl.rewards import RewardOutput


class HashReward:
    """Reward 1 when crc32(response + gold) is divisible by ``modulus``; accepts the real knobs."""

    def __init__(self, modulus: int = 3, **_: object) -> None:
        self.modulus = modulus

    def __call__(self, responses, golds, modes=None) -> RewardOutput:
        rewards = [float(zlib.crc32(f"{r}|{g}".encode()) % self.modulus == 0) for r, g in zip(responses, golds, strict=True)]
        return RewardOutput(rewards, timeouts=0, failures=0)

    def close(self) -> None:
        pass
