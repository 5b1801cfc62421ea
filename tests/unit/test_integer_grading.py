"""The toy worlds' grader (``reward.mode=integer``): a toy answer is one integer literal.

math-verify evaluates expressions, so with ``mode=math`` the question copied into the box scored
1 (``\\boxed{12+5+4+6}`` for gold 27) and RL could learn to copy. These cases fail with that mode.
"""

import pytest

from relift_pl.rewards import MathVerifyReward
from relift_pl.rewards.extract import integer_literal
from relift_pl.toy import world, world2


def boxed(pred: str) -> str:
    return "</think>\\boxed{" + pred + "}"


# (response, gold, expected reward)
CASES = [
    # The question copied into the box: an expression that evaluates to the gold is no answer.
    (boxed("12+5+4+6"), "27", 0.0),
    (boxed("12+5"), "17", 0.0),
    (boxed("-9-2-5"), "-16", 0.0),  # the first world's level 4
    (boxed("-(9+2+5)"), "-16", 0.0),
    (boxed("R4831"), "1384", 0.0),  # the second world's level 4
    (boxed("3*9"), "27", 0.0),
    (boxed("27=27"), "27", 0.0),
    (boxed("20+7=27"), "27", 0.0),
    (boxed(r"\frac{54}{2}"), "27", 0.0),
    (boxed("27.0"), "27", 0.0),
    (boxed("2 7"), "27", 0.0),
    (boxed("- 16"), "-16", 0.0),
    (boxed("27,"), "27", 0.0),
    (boxed(r"\text{27}"), "27", 0.0),
    (boxed("4831"), "1384", 0.0),  # the base's copy
    (boxed("16"), "-16", 0.0),  # the first world's base: the sign missing
    (boxed("٣٨٤"), "384", 0.0),  # Arabic-Indic digits: not the toy's integer literals
    (boxed("３８４"), "384", 0.0),  # full-width digits
    # Right answers, as the demonstrations and the base write them.
    (boxed("27"), "27", 1.0),
    (boxed(" 27 "), "27", 1.0),
    (boxed("$27$"), "27", 1.0),
    (boxed("+27"), "27", 1.0),
    (boxed("-16"), "-16", 1.0),
    (boxed("1384"), "1384", 1.0),
    ("12+5=17,17+7=24</think>\\boxed{24}", "24", 1.0),
    # Only the last box after the last </think> counts, and the think gate holds.
    ("</think>\\boxed{27}\\boxed{28}", "27", 0.0),
    ("</think>\\boxed{28}\\boxed{27}", "27", 1.0),
    ("\\boxed{27}", "27", 0.0),  # no </think>
    ("</think>27", "27", 0.0),  # no box
    ("</think>\\boxed{27", "27", 0.0),  # unclosed box
    (boxed("9" * 100_000), "27", 0.0),  # past int()'s digit limit: no error, just wrong
    (boxed("27"), "twenty-seven", 0.0),  # a gold that is no integer matches nothing
]


@pytest.fixture(scope="module")
def reward():
    with MathVerifyReward(mode="integer", num_workers=0) as grader:
        yield grader


def test_integer_mode_grades_the_hand_cases(reward):
    responses, golds, expected = zip(*CASES, strict=True)
    out = reward(list(responses), list(golds))
    wrong = [(r[:40], g, e) for r, g, e, got in zip(responses, golds, expected, out.rewards, strict=True) if got != e]
    assert not wrong, f"graded wrongly: {wrong}"
    assert out.timeouts == out.failures == 0


def test_math_mode_would_accept_the_copied_question():
    """Why the toy worlds need their own mode: math-verify evaluates the copied question."""
    with MathVerifyReward(mode="math", num_workers=0) as grader:
        assert grader([boxed("12+5+4+6"), boxed("-9-2-5")], ["27", "-16"]).rewards == [1.0, 1.0]


def test_integer_literal():
    assert integer_literal("0042") == 42 and integer_literal("-7") == -7
    assert integer_literal("4.0") is None and integer_literal("") is None
    assert integer_literal("1e3") is None and integer_literal("0x1F") is None


@pytest.mark.parametrize(
    ("pool", "levels"),
    [(world.level_pool, world.LEVELS), (world2.level_pool, world2.LEVELS)],
    ids=["toy", "toy2"],
)
def test_every_demonstration_scores_and_no_copied_question_does(reward, pool, levels):
    """Each world's demonstrations score 1 against their answers; each problem copied into the
    box scores 0 (STUDY.md: a grader must not accept the question as its answer)."""
    rows = [row for level in levels for row in pool("val", level)]
    demos = reward([r["demonstration"] for r in rows], [r["answer"] for r in rows])
    assert demos.rewards == [1.0] * len(rows)
    copies = reward([boxed(r["problem"]) for r in rows], [r["answer"] for r in rows])
    assert sum(copies.rewards) == 0, [r["problem"] for r, s in zip(rows, copies.rewards, strict=True) if s]


def test_the_toy_experiments_grade_integers(make_cfg):
    for experiment in ("toy", "toy2", "toy_paper", "toy2_paper"):
        assert make_cfg(f"experiment={experiment}").reward.mode == "integer", experiment


def test_evaluating_toy_rows_grades_integers_whatever_the_reward_mode(make_cfg):
    """evaluate.py with model=tiny2 data=toy2 (no toy experiment) composes reward.mode=auto: the
    rows' own grading mode keeps the copied question wrong there too."""
    rows = world2.make_rows("val", [3], 4, seed=0)
    with MathVerifyReward(mode="auto", num_workers=0) as grader:
        responses = [boxed(r["problem"]) for r in rows]
        assert grader(responses, [r["answer"] for r in rows], [r["grading"] for r in rows]).rewards == [0.0] * 4
        assert grader(responses, [r["answer"] for r in rows]).rewards == [1.0] * 4  # math-verify alone
