"""Benchmark golds through the real MathVerifyReward.

First the golds the grader could not read (Python notation, parser gaps, stray delimiters): an
equivalent LaTeX answer scores 1, a wrong one 0. The golds are copied from
paths.data_dir/benchmarks (row id in each case); a test checks the copies against the shared
files when they are present. Then every gold of the eight shared benchmarks: it scores 1 against
itself, boxed as it is and as a model would box it, and math-verify reads it as math, unless it
is listed in KNOWN_UNMATCHABLE with the reason.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from relift_pl.data.sources import load_rows
from relift_pl.rewards import MathVerifyReward
from relift_pl.rewards.verifier import gold_is_readable

# paths.data_dir's default (conf/paths/default.yaml).
ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("RELIFT_DATA_DIR", ROOT.parent / "shared" / "data")) / "benchmarks"

# id -> (gold as stored, an equivalent answer, a wrong answer)
GOLDS = {
    # Python: read as asin(10/13) only once np.arcsin becomes \arcsin.
    "minerva-0005": (
        "np.arcsin(10/13)",
        r"\arcsin\left(\frac{10}{13}\right)",
        r"\arcsin\left(\frac{12}{13}\right)",
    ),
    # \odot in a subscript stops the parser; the answer may give the right-hand side only.
    "minerva-0027": (
        r"\frac{dM}{dt}=\frac{10^{5} L_{\odot}}{0.007 c^{2} M_{\odot}^{6}} M^{6}",
        r"\frac{10^5 L_\odot M^6}{0.007 c^2 M_\odot^6}",
        r"\frac{10^5 L_\odot M^5}{0.007 c^2 M_\odot^6}",
    ),
    # Python float literals: "-1./3" was read as -1.
    "minerva-0038": ("-1./3", r"-\frac{1}{3}", "-1"),
    "minerva-0049": ("-3./2", r"-\frac{3}{2}", "-3"),
    # E followed by a subscript stops the parser (E is Euler's number to it).
    # Also found by the same rewrites: a derivative equation, an E_0 in a longer expression.
    "minerva-0064": (r"\frac{d x}{d t}=k x-a", "kx-a", "kx+a"),
    "minerva-0261": (
        r"\hbar \omega(v+1 / 2)-\frac{E_{0}^{2} e^{2}}{2 m \omega^{2}}",
        r"\hbar\omega\left(v+\frac{1}{2}\right)-\frac{e^2E_0^2}{2m\omega^2}",
        r"\hbar\omega\left(v+\frac{1}{2}\right)-\frac{e^2E_0^2}{m\omega^2}",
    ),
    "minerva-0268": (
        r"\frac{1}{3} E_{1}+\frac{2}{3} E_{2}", r"\frac{E_1+2E_2}{3}", r"\frac{2E_1+E_2}{3}"
    ),
    "minerva-0269": ("E_{1},E_{2}", "E_1, E_2", "E_1"),
    # \max in a subscript stops the parser.
    "olympiadbench-0034": ("$m_{\\max }=n^{2}-n-1$", "n^2-n-1", "n^2-n"),
    # "t(0,4]" means t in (0,4].
    "olympiadbench-0096": ("$t(0,4]$", "(0,4]", "(0,4)"),
    # Math delimiters inside a gold: the parser read only the piece before the first one.
    "minerva-0072": (
        r"x_{0} \cos (\omega t)+$ $\dot{x}_{0} \sin (\omega t) / \omega",
        r"x_0\cos(\omega t)+\frac{\dot{x}_0}{\omega}\sin(\omega t)",
        r"x_0\cos(\omega t)",
    ),
    "olympiadbench-0194": ("$221,$8$", "221, 8", "221"),
    # A sentence's final period after the formula.
    "olympiadbench-0076": (r"$(-\infty, 0) \cup\{1\}$.", r"\{1\}\cup(-\infty,0)", r"(-\infty,0)"),
}


@pytest.fixture(scope="module")
def reward():
    with MathVerifyReward(num_workers=1, timeout_s=60.0) as fn:
        yield fn


@pytest.mark.parametrize("row_id", list(GOLDS))
def test_equivalent_answer_scores_1_and_wrong_answer_0(reward, row_id):
    gold, right, wrong = GOLDS[row_id]
    out = reward([f"</think> \\boxed{{{right}}}", f"</think> \\boxed{{{wrong}}}"], [gold, gold])
    assert out.rewards == [1.0, 0.0]
    assert (out.timeouts, out.failures) == (0, 0)


def test_golds_are_the_shared_files_rows():
    files = {name: DATA / f"{name}.jsonl" for name in ("minerva", "olympiadbench")}
    if not all(path.exists() for path in files.values()):
        pytest.skip(f"benchmarks not found under {DATA}")
    stored = {}
    for path in files.values():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            stored[row["id"]] = row["answer"]
    assert {row_id: stored[row_id] for row_id in GOLDS} == {k: v[0] for k, v in GOLDS.items()}


BENCHMARKS = {  # file -> grading, as conf/data/benchmarks/all.yaml loads them
    "aime24.jsonl": "math", "aime25.jsonl": "math", "amc23.jsonl": "math", "math500.jsonl": "math",
    "minerva.jsonl": "math", "olympiadbench.jsonl": "math", "gpqa_diamond.jsonl.gz": "choice",
    "arc_c.jsonl": "choice",
}  # fmt: skip
# id -> why no answer can score 1 against its gold through the grader (kept exact by the test).
KNOWN_UNMATCHABLE: dict[str, str] = {}
_DELIMITER = re.compile(r"(?<!\\)\$")  # not MATH-500's money "\\$"


def as_a_model_boxes_it(gold: str) -> str:
    """The gold without math delimiters or a final period: what a model writes in its box."""
    return _DELIMITER.sub("", gold).strip().removesuffix(".")


def test_every_benchmark_gold_is_matchable(reward):
    if not DATA.is_dir():
        pytest.skip(f"benchmarks not found under {DATA}")
    rows = [row for name, grading in BENCHMARKS.items() for row in load_rows(str(DATA / name), grading=grading)]
    assert len(rows) == 2960  # all eight files, every row
    golds = [row["answer"] for row in rows]
    responses = [f"</think>\\boxed{{{form(g)}}}" for g in golds for form in (str, as_a_model_boxes_it)]
    modes = [row["grading"] for row in rows for _ in range(2)]
    out = reward(responses, [g for g in golds for _ in range(2)], modes)
    assert (out.timeouts, out.failures) == (0, 0)
    unmatchable = {}
    for i, row in enumerate(rows):
        as_is, as_boxed = out.rewards[2 * i : 2 * i + 2]
        if as_is != 1.0:
            unmatchable[row["id"]] = "scores 0 against itself"
        elif as_boxed != 1.0:
            unmatchable[row["id"]] = f"scores 0 against {as_a_model_boxes_it(row['answer'])!r}"
        elif row["grading"] == "math" and not gold_is_readable(row["answer"]):
            unmatchable[row["id"]] = "is not math to math-verify"
    assert {k: v for k, v in unmatchable.items() if k not in KNOWN_UNMATCHABLE} == {}
    assert set(KNOWN_UNMATCHABLE) <= set(unmatchable)  # a fixed one leaves the list
