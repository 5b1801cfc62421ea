"""The second toy world: the paper's premise built in (`experiment=toy2`).

The first world (`relift_pl.toy.world`) made ReLIFT's hardest level a sign flip on level 2's
additions and wrote every demonstration in the base's own terse style. Its study found the
hardest skill entangled with the easy ones, and nothing for SFT on all demonstrations to cost
but accuracy. This world changes both, and docs/results/toy2_premise.md measures the premise
(P1-P4) on it:

1. The hardest level is a new operator behind its own prompt letter: `R4831` asks for the digits
   backwards, then without the first (`1384` -> `384`; 4 distinct digits 1-9, so no copy hits it
   by luck). The base knows each step and how to chain two (its warm-start's digit tasks: one
   step under `B`, `D`, `T`, every other ordered pair of steps under `K M P W F`), but every
   other letter asks for a copy, so it answers `R4831` with `4831`. What it lacks is knowledge
   (which steps R asks for), which sampling does not find: a correct sample needs two tokens the
   base all but never writes (median probabilities from about 1e-7 on the shipped base to 3e-4
   on build seed 1, measured per base in docs/results/toy2_premise.md), where one such token (the second edition's level 4, backwards
   alone) was found by RL on some bases. A few dozen demonstrations teach it. Nothing the easy
   levels need is touched: other prompts, other outputs.
2. Demonstrations (the "R1 traces" of this world) are written in a verbose style that the base
   uses for digit tasks but never for arithmetic, still ending in the boxed answer the reward
   checks:

    level 1  12+5        base:    12+5=17</think>\\boxed{17}
                         teacher: 12+5=17, so the answer is 17.</think>\\boxed{17}
    level 2  12+5+7      base:    12+5=17,17+7=24</think>\\boxed{24}
                         teacher: 12+5=17, then 17+7=24, so the answer is 24.</think>\\boxed{24}
    level 3  12+5+7+3    (one more step of the same kind; the base finishes it only sometimes)
    level 4  R4831       teacher: the digits are 4,8,3,1, backwards 1,3,8,4, without the first
                         3,8,4, so the answer is 384.</think>\\boxed{384}

   SFT on every demonstration moves every level to the teacher's style (about 2.4x the tokens on
   levels 1-3, as SFT on R1 traces lengthens a 7B model's answers); imitating only the hardest
   questions leaves levels 1-3 in the policy's own style.

Levels 1-3 are the first world's problems, drawn with the same split hash and seeds, so the eval
sets of levels 1-3 hold the same questions in both worlds. Splits are a pure function of the
problem text; answers come from the generator's integers.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from relift_pl.toy.world import SPLITS, Split, ToyWorldConfig, _enumerate, split_of

LEVELS = (1, 2, 3, 4)
"""All levels, easiest first; level 4 (backwards, then without the first digit) is the one the base never solves."""

Style = Literal["verbose", "terse"]
STYLES = ("verbose", "terse")


@dataclass(frozen=True)
class ToyWorld2Config:
    """Knobs of the second world (levels 1-3 take the first world's `ToyWorldConfig`)."""

    arithmetic: ToyWorldConfig = ToyWorldConfig()
    """Levels 1-3: operand ranges and split fractions (the first world's defaults)."""
    reverse_digits: int = 4
    """Digits of a level-4 number (distinct, 1-9): one of the lengths the base reverses under B."""


def _arith_steps(text: str) -> list[tuple[int, int, int]]:
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
        if style == "terse":
            raise ValueError("level 4 has no terse demonstration: the base never saw it")
        return _listing("R", problem[1:])
    steps = _arith_steps(problem)
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


# The base's "pretraining" beyond arithmetic: a digit task named by a capital letter, on a number
# of 3-5 distinct digits 1-9, answered in the teacher's words (so the words are not new to the
# base, only their use for arithmetic is). A task is a chain of steps, each written out on the
# previous step's digits; the answer is the last listing. Three letters ask for one step, five for
# two (every ordered pair of different steps but one), every other letter asks for a copy, so a
# letter the base never saw reads as "copy" too. `R` is kept out of the warm-start: level 4
# (`R4831` -> `384`) is the held-out pair, backwards then without the first. Sampling it takes two
# decisions the base never makes: leave the copy (write "backwards" where a copy writes "so"),
# then go on after "backwards" with the step no warm-start task puts there. Each is about as
# unlikely as a token the base was trained against (1e-7 to 1e-4, depending on the base's random
# draw), and RL needs both in one sample; SFT has only to route R to steps the base can chain.
STEPS: dict[str, Callable[[str], str]] = {
    "backwards": lambda d: d[::-1],
    "without the first": lambda d: d[1:],
    "first to the end": lambda d: d[1:] + d[0],
}
TASKS: dict[str, tuple[str, ...]] = {
    "B": ("backwards",),
    "D": ("without the first",),
    "T": ("first to the end",),
    "K": ("backwards", "first to the end"),
    "M": ("without the first", "backwards"),
    "P": ("first to the end", "backwards"),
    "W": ("without the first", "first to the end"),
    "F": ("first to the end", "without the first"),
    "R": ("backwards", "without the first"),  # level 4 only: never in the warm-start
}
COPY_LETTERS = "ACEGHIJLNOQSUVXYZ"
"""Letters that ask for a copy (every capital without a task)."""
TASK_LENGTHS = (3, 4, 5)
TASK_WEIGHTS = {"copy": 2, "B": 1, "D": 1, "T": 1} | {letter: 0.4 for letter in "KMPWF"}
"""Relative shares of the digit tasks in the warm-start."""


def _task_answer(letter: str, digits: str) -> str:
    for step in TASKS.get(letter, ()):  # a copy letter has no step
        digits = STEPS[step](digits)
    return digits


def _listing(letter: str, digits: str) -> str:
    """The teacher's words for a digit task: the digits, each step's digits, the answer."""
    text = f"the digits are {','.join(digits)},"
    for step in TASKS.get(letter, ()):
        digits = STEPS[step](digits)
        text += f" {step} {','.join(digits)},"
    return f"{text} so the answer is {digits}.</think>\\boxed{{{digits}}}"


def warmstart_recipe() -> dict:
    """What `draw_pretraining_row` draws from (part of the base's cache key)."""
    return {"tasks": {letter: list(steps) for letter, steps in TASKS.items()}, "weights": TASK_WEIGHTS,
            "copy_letters": COPY_LETTERS, "lengths": list(TASK_LENGTHS)}


def draw_pretraining_row(rng: random.Random) -> dict:
    """One digit-task row of the base's warm-start (`TASK_WEIGHTS`, a uniform letter for a copy,
    a uniform length in `TASK_LENGTHS`, uniform distinct digits)."""
    task = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
    letter = rng.choice(COPY_LETTERS) if task == "copy" else task
    digits = "".join(map(str, rng.sample(range(1, 10), rng.choice(TASK_LENGTHS))))
    return {"id": f"toy2-task-{letter}{digits}", "problem": letter + digits,
            "answer": _task_answer(letter, digits), "demonstration": _listing(letter, digits), "level": 0}


def _problems(level: int, cfg: ToyWorld2Config) -> list[str]:
    if level in (1, 2, 3):
        return [p.text for p in _enumerate(level, cfg.arithmetic)]
    if level == 4:
        return ["R" + "".join(map(str, xs))
                for xs in itertools.permutations(range(1, 10), cfg.reverse_digits)]
    raise ValueError(f"unknown level {level}; levels are {LEVELS}")


def answer_of(problem: str, level: int) -> str:
    if level == 4:
        return _task_answer(problem[0], problem[1:])
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
            "grading": "integer",  # evaluate.py grades the toy's rows as numbers, whatever reward.mode
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
