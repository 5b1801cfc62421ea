"""The second toy world: the paper's premise built in (`experiment=toy2`).

The first world (`relift_pl.toy.world`) made ReLIFT's hardest level a sign flip on level 2's
additions, and wrote every demonstration in the base's own terse style. Its study found the
hardest skill entangled with the easy ones and nothing for SFT on all demonstrations to cost
but accuracy. This world changes two things, each for one half of the paper's premise:

1. The hardest level is a new skill behind its own prompt token: reversing the digits of a
   four-digit number, `R4831` -> `1384` (distinct digits, no zero: no palindrome, no leading
   zero, and no two orders of the same digits that a copy could hit by luck). The base was never
   shown an `R` or a reversal and boxes sums; RL never samples the answer. Nothing the easy
   levels need is contradicted by it: other prompts, other outputs.
2. Demonstrations (the "R1 traces" of this world) are written in a verbose style the base does
   not use, still ending in the boxed answer the reward checks:

    level 1  12+5        base:    12+5=17</think>\\boxed{17}
                         teacher: step 1: 12+5=17. so the answer is 17.</think>\\boxed{17}
    level 2  12+5+7      base:    12+5=17,17+7=24</think>\\boxed{24}
                         teacher: step 1: 12+5=17. step 2: 17+7=24. so the answer is 24.</think>...
    level 3  12+5+7+3    (one more step of the same kind; the base finishes it only sometimes)
    level 4  R4831       teacher: the digits are 4,8,3,1. backwards: 1,3,8,4. so the answer
                         is 1384.</think>\\boxed{1384}

   SFT on every demonstration moves every level to the teacher's style (about twice as many
   tokens, as SFT on R1 traces lengthens a 7B model's answers); imitating only the hardest
   questions leaves levels 1-3 in the policy's own style.

Levels 1-3 are the first world's problems with the same split hash, so the same cached base
(warm-started on the terse style of levels 1-2 and part of 3) serves both worlds. Splits are a
pure function of the problem text; answers come from the generator's integers.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from relift_pl.toy.world import SPLITS, Split, ToyWorldConfig, _enumerate, split_of

LEVELS = (1, 2, 3, 4)
"""All levels, easiest first; level 4 (digit reversal) is the one the base never solves."""

Style = Literal["verbose", "terse"]
STYLES = ("verbose", "terse")


@dataclass(frozen=True)
class ToyWorld2Config:
    """Knobs of the second world (levels 1-3 take the first world's `ToyWorldConfig`)."""

    arithmetic: ToyWorldConfig = ToyWorldConfig()
    """Levels 1-3: operand ranges and split fractions (the first world's defaults)."""
    reverse_digits: int = 4
    """Digits of a level-4 number (distinct, 1-9)."""


def _arith_steps(text: str, level: int, cfg: ToyWorldConfig) -> list[tuple[int, int, int]]:
    del cfg
    xs = [int(x) for x in text.split("+")]
    steps, total = [], xs[0]
    for x in xs[1:]:
        steps.append((total, x, total + x))
        total += x
    return steps


def demonstration(problem: str, level: int, style: Style = "verbose", stop_after: int | None = None) -> str:
    """The worked solution of `problem` in a style.

    Args:
        problem: the problem text (`a+b...` for levels 1-3, `R` + digits for level 4).
        level: its level.
        style: `verbose` (the teacher: the training demonstrations) or `terse` (the base's own
            style, what its warm-start saw).
        stop_after: levels 1-3, terse only: keep `steps[:stop_after]` and box that partial
            result (the warm-start's "one step short" habit, see `relift_pl.toy.base`).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if level == 4:
        digits = list(problem[1:])
        answer = "".join(reversed(digits))
        if style == "terse":
            return f"{','.join(digits)};{','.join(reversed(digits))}</think>\\boxed{{{answer}}}"
        return (f"the digits are {','.join(digits)}, backwards {','.join(reversed(digits))}, "
                f"so the answer is {answer}.</think>\\boxed{{{answer}}}")
    steps = _arith_steps(problem, level, ToyWorldConfig())
    if stop_after is not None:
        if style != "terse":
            raise ValueError("stop_after is for the base's terse warm-start demonstrations")
        steps = steps[:stop_after]
    result = steps[-1][2]
    if style == "terse":
        body = ",".join(f"{a}+{b}={c}" for a, b, c in steps)
        return f"{body}</think>\\boxed{{{result}}}"
    body = ", then ".join(f"{a}+{b}={c}" for a, b, c in steps)
    return f"{body}, so the answer is {result}.</think>\\boxed{{{result}}}"


def _problems(level: int, cfg: ToyWorld2Config) -> list[str]:
    if level in (1, 2, 3):
        return [p.text for p in _enumerate(level, cfg.arithmetic)]
    if level == 4:
        return ["R" + "".join(map(str, xs))
                for xs in itertools.permutations(range(1, 10), cfg.reverse_digits)]
    raise ValueError(f"unknown level {level}; levels are {LEVELS}")


def answer_of(problem: str, level: int) -> str:
    if level == 4:
        return problem[1:][::-1]
    return str(sum(int(x) for x in problem.split("+")))


def level_pool(
    split: Split,
    level: int,
    config: ToyWorld2Config | None = None,
    *,
    style: Style = "verbose",
    stop_after: int | None = None,
) -> list[dict]:
    """All rows of one level in one split, in a fixed order (schema of `make_rows`)."""
    return [dict(r) for r in _cached_pool(split, level, config or ToyWorld2Config(), style, stop_after)]


@functools.lru_cache(maxsize=32)
def _cached_pool(split: str, level: int, cfg: ToyWorld2Config, style: str, stop_after: int | None):
    a = cfg.arithmetic
    return tuple(
        {
            "id": f"toy2-L{level}-{p}",
            "problem": p,
            "answer": answer_of(p, level),
            "demonstration": demonstration(p, level, style, stop_after),  # type: ignore[arg-type]
            "level": level,
        }
        for p in _problems(level, cfg)
        if split_of(p, a.test_fraction, a.val_fraction) == split
    )


def make_rows(
    split: Split,
    levels: Sequence[int],
    n_per_level: int,
    seed: int,
    config: ToyWorld2Config | None = None,
    style: Style = "verbose",
) -> list[dict]:
    """Up to `n_per_level` distinct problems of each level from one split (as
    `relift_pl.toy.world.make_rows`: grouped by level in the order of `levels`, shuffled within
    each, seeded per (seed, split, level)). Demonstrations in `style` (the teacher's by default).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = []
    for level in levels:
        pool = level_pool(split, level, config, style=style)
        rng = random.Random(f"{seed}-{split}-{level}")
        rows.extend(rng.sample(pool, min(n_per_level, len(pool))))
    return rows
