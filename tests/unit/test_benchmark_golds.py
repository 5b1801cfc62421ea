"""Benchmark golds the grader could not read (Python notation, parser gaps), through the real
MathVerifyReward: an equivalent LaTeX answer scores 1, a wrong one 0.

The golds are copied from paths.data_dir/benchmarks (row id in each case); the last test checks
the copies against the shared files when they are present.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from relift_pl.rewards import MathVerifyReward

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
