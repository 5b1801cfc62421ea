"""A toy reasoning world: multi-step integer arithmetic with difficulty levels.

The world exists so that `python train.py` shows ReLIFT's mechanism on a laptop CPU in minutes.
Every problem is a short expression evaluated left to right; its demonstration writes one step
per operation, then the answer, in the response format the real path uses (the prompt ends with
`<think>`):

    level 1  a+b        12+5          ->  12+5=17</think>\\boxed{17}
    level 2  a+b+c      12+5+7        ->  12+5=17,17+7=24</think>\\boxed{24}
    level 3  a+b+c+d    12+5+7+3      ->  12+5=17,17+7=24,24+3=27</think>\\boxed{27}
    level 4  -a-b-c     -3-7-2        ->  3+7=10,10+2=12</think>\\boxed{-12}

Why the levels behave as RL and SFT need them to (see `relift_pl.toy.base`):
- Levels 1-2 are the warm-start's curriculum: the base policy solves them.
- Level 3 only adds one more step of the same kind. The warm-start sees some of it, mostly with
  demonstrations that stop one step early (a knob sets how many are complete), so the base
  learns to finish it only sometimes: RL has a signal to sharpen, and one decision to fix.
- Level 4 is level 2's arithmetic behind a sign: -a-b-c = -(a+b+c). The demonstration adds the
  magnitudes exactly as level 2 does and boxes the sum with a "-", a character the base was
  never trained to write. The base answers with the positive sum or noise; it never samples a
  correct answer and every group is all-wrong. What the demonstrations teach is one piece of
  knowledge RL cannot find by sampling (a "-" before the box when the problem starts with one),
  which is what ReLIFT's SFT steps on these hardest questions do.
  Earlier designs and why they were replaced: a*b+c let the base hit 1-3% by luck (its noisy
  sums land in the range of the products); a-b-c (a < b) needed 36 subtraction facts, and
  -a-b-c with signed steps (-3-7=-10) a new way of copying operands; this 0.3M-parameter model
  learned either too slowly for a CPU budget (about 10% after ~900 demonstrations, on the
  validation split) while every method that used them lost more on levels 1-3.

Splits are decided by hashing the problem text, independently of any seed, so the train,
validation and test sets never share a problem: settings are chosen on validation and reported
on test. Answers come from the
generator's own integers; nothing is ever evaluated from text.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

LEVELS = (1, 2, 3, 4)
"""All difficulty levels, easiest first; level 4 is the one the base never solves."""


@dataclass(frozen=True)
class ToyWorldConfig:
    """Knobs of the toy world. The defaults are the ones the cached base was tuned with."""

    first_operand: tuple[int, int] = (1, 20)
    """Inclusive range of the first addend of levels 1-3; two digits give level 1 enough problems."""
    operand: tuple[int, int] = (1, 9)
    """Inclusive range of every other operand (and of level 4's magnitudes)."""
    test_fraction: float = 0.25
    """Share of each level's problems (by hash of the text) that belong to the test split."""
    val_fraction: float = 0.15
    """Share that belongs to the validation split (choose settings on it; report on test)."""


@dataclass(frozen=True)
class _Problem:
    """One expression as integers, so the answer and steps never come from parsing text."""

    level: int
    operands: tuple[int, ...]
    ops: tuple[str, ...]  # "+" or "-", applied left to right; len(ops) == len(operands) - 1
    negated: bool = False
    """Level 4: the text is "-a-b-c", solved as -(a+b+c): the steps add the magnitudes."""

    @property
    def text(self) -> str:
        if self.negated:
            return "".join(f"-{x}" for x in self.operands)
        return str(self.operands[0]) + "".join(
            f"{op}{x}" for op, x in zip(self.ops, self.operands[1:], strict=True)
        )

    @property
    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, op, right, result) for each operation, left to right."""
        steps, total = [], self.operands[0]
        for op, x in zip(self.ops, self.operands[1:], strict=True):
            result = total + x if op == "+" else total - x
            steps.append((total, op, x, result))
            total = result
        return steps

    def boxed(self, result: int) -> int:
        return -result if self.negated else result

    @property
    def answer(self) -> int:
        return self.boxed(self.steps[-1][3])

    def demonstration(self, stop_after: int | None = None) -> str:
        """The worked solution, cut to `steps[:stop_after]` (boxing that partial result)."""
        steps = self.steps[:stop_after]
        body = ",".join(f"{left}{op}{right}={result}" for left, op, right, result in steps)
        return f"{body}</think>\\boxed{{{self.boxed(steps[-1][3])}}}"


def _enumerate(level: int, cfg: ToyWorldConfig) -> list[_Problem]:
    """Every problem of a level, in a fixed order."""
    first = range(cfg.first_operand[0], cfg.first_operand[1] + 1)
    rest = range(cfg.operand[0], cfg.operand[1] + 1)
    if level in (1, 2, 3):
        return [
            _Problem(level, xs, ("+",) * level) for xs in itertools.product(first, *[rest] * level)
        ]
    if level == 4:  # -a-b-c = -(a+b+c): a negative answer, a sign the base never writes
        return [
            _Problem(level, xs, ("+", "+"), negated=True) for xs in itertools.product(rest, rest, rest)
        ]
    raise ValueError(f"unknown level {level}; levels are {LEVELS}")


Split = Literal["train", "val", "test"]
SPLITS = ("train", "val", "test")


def split_of(problem: str, test_fraction: float, val_fraction: float = 0.0) -> Split:
    """Which split a problem text belongs to; a pure function of the text."""
    u = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def level_pool(
    split: Split,
    level: int,
    config: ToyWorldConfig | None = None,
    *,
    stop_after: int | None = None,
) -> list[dict]:
    """All rows of one level in one split, in a fixed order (see `make_rows` for the schema).

    Args:
        split: "train", "val" or "test".
        level: difficulty level.
        config: world knobs; `ToyWorldConfig()` when None.
        stop_after: if set, demonstrations keep `steps[:stop_after]` (so -1: one step short)
            and box that partial result, a wrong answer: the warm-start's "gives up one step
            early" habit on the middle level (see `relift_pl.toy.base`). `answer` stays true.
    """
    # Fresh dicts: callers may mutate rows, the cache must not see it.
    return [dict(r) for r in _cached_pool(split, level, config or ToyWorldConfig(), stop_after)]


@functools.lru_cache(maxsize=32)
def _cached_pool(
    split: str, level: int, cfg: ToyWorldConfig, stop_after: int | None
) -> tuple[dict, ...]:
    # Level 3 has ~15k problems to build and hash: do it once per process.
    return tuple(
        {
            "id": f"toy-L{level}-{p.text}",
            "problem": p.text,
            "answer": str(p.answer),
            "demonstration": p.demonstration(stop_after),
            "level": level,
            "grading": "integer",  # evaluate.py grades the toy's rows as numbers, whatever reward.mode
        }
        for p in _enumerate(level, cfg)
        if split_of(p.text, cfg.test_fraction, cfg.val_fraction) == split
    )


def make_rows(
    split: Split,
    levels: Sequence[int],
    n_per_level: int,
    seed: int,
    config: ToyWorldConfig | None = None,
) -> list[dict]:
    """Draw up to `n_per_level` distinct problems of each level from one split.

    A level with fewer problems in the split than `n_per_level` contributes all of them (with the
    defaults: level 1 has 113 train / 21 val / 46 test problems).

    Args:
        split: "train", "val" or "test"; no two share a problem, whatever the seed.
        levels: difficulty levels to draw from (subset of `LEVELS`).
        n_per_level: problems per level (at most).
        seed: which problems are drawn and in which order.
        config: world knobs; `ToyWorldConfig()` when None.

    Returns:
        Rows in the schema of the real data loaders: {"id", "problem", "answer",
        "demonstration", "level", "grading"}; `demonstration` is the response without prompt
        and EOS; `grading` is "integer" (the answer is one integer literal).
        Rows are grouped by level in the order of `levels`, shuffled within each level.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = []
    for level in levels:
        pool = level_pool(split, level, config)
        # Seed per (seed, level) so adding a level never changes the others' draws.
        rng = random.Random(f"{seed}-{split}-{level}")
        rows.extend(rng.sample(pool, min(n_per_level, len(pool))))
    return rows
