"""MathVerifyReward: grading table against real math-verify, plus timeouts, crashes, hostile input.

Cases where math-verify differs from what a human grader may expect are marked "math-verify:".
"""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from relift_pl.rewards import MathVerifyReward


def boxed(pred: str) -> str:
    return "</think>\\boxed{" + pred + "}"


GATE_OFF = {"require_think_close": False}
CHOICE = {"mode": "choice"}
# (response, gold, expected reward, MathVerifyReward kwargs)
CASES = [
    pytest.param(boxed("0.5"), r"\frac{1}{2}", 1.0, {}, id="decimal-vs-frac"),
    pytest.param(boxed(r"\frac{1}{2}"), "0.5", 1.0, {}, id="frac-vs-decimal"),
    pytest.param(boxed(r"\dfrac{1}{2}"), r"\frac12", 1.0, {}, id="dfrac"),
    pytest.param(boxed(r"\tfrac{3}{4}"), "0.75", 1.0, {}, id="tfrac"),
    pytest.param(boxed("1/2"), r"\frac{1}{2}", 1.0, {}, id="slash-frac"),
    pytest.param(boxed("0.33"), r"\frac{1}{3}", 0.0, {}, id="too-coarse-decimal"),
    pytest.param(boxed("0.333333"), r"\frac{1}{3}", 1.0, {}, id="six-digit-decimal"),
    pytest.param(boxed("(1,2]"), "(1, 2]", 1.0, {}, id="interval"),
    pytest.param(boxed("[1,2]"), "(1,2)", 0.0, {}, id="interval-closedness"),
    pytest.param(boxed(r"[0,\infty)"), r"[0, \infty)", 1.0, {}, id="interval-infinity"),
    pytest.param(boxed(r"x \in [1,2]"), "[1,2]", 1.0, {}, id="membership-interval"),
    pytest.param(boxed(r"\{3,2,1\}"), r"\{1,2,3\}", 1.0, {}, id="set-order"),
    pytest.param(boxed("1, 2, 3"), r"\{1,2,3\}", 1.0, {}, id="list-vs-set"),
    # math-verify: a bare comma list is a set, so order does not matter.
    pytest.param(boxed("3, 2, 1"), "1,2,3", 1.0, {}, id="bare-list-unordered"),
    pytest.param(boxed("(2,1)"), "(1,2)", 0.0, {}, id="tuple-order"),
    pytest.param(
        boxed(r"(3,\frac{\pi}{2})"), r"\left( 3, \frac{\pi}{2} \right)", 1.0, {}, id="tuple"
    ),
    pytest.param(boxed(r"10\text{ cm}"), "10", 1.0, {}, id="unit-in-pred"),
    pytest.param(boxed("10"), r"10\text{ cm}", 1.0, {}, id="unit-in-gold"),
    # math-verify: words inside \text{} are not stripped like units.
    pytest.param(boxed(r"\text{5 apples}"), "5", 0.0, {}, id="text-words"),
    pytest.param(boxed(r"30^\circ"), "30", 1.0, {}, id="degrees-pred"),
    pytest.param(boxed("30"), r"30^{\circ}", 1.0, {}, id="degrees-gold"),
    pytest.param(boxed(r"50\%"), "50", 1.0, {}, id="percent-pred"),
    pytest.param(boxed("50"), r"50\%", 1.0, {}, id="percent-gold"),
    # math-verify: 50% is 50, not 0.5.
    pytest.param(boxed("0.5"), r"50\%", 0.0, {}, id="percent-vs-fraction"),
    pytest.param(boxed("-3"), "-3", 1.0, {}, id="negative"),
    pytest.param(boxed("- 3"), "-3", 1.0, {}, id="negative-spaced"),
    pytest.param(boxed("3"), "-3", 0.0, {}, id="sign-matters"),
    # math-verify reads 4.5e33 as 4.5*e*33; the wrapper rewrites it to 4.5\times10^{33}.
    pytest.param(boxed(r"4.5\times10^{33}"), "4.5e33", 1.0, {}, id="sci-gold"),
    pytest.param(boxed(r"3.83 \times 10^{35}"), "3.83e35", 1.0, {}, id="sci-gold-spaced"),
    pytest.param(boxed("1.5e3"), "1500", 1.0, {}, id="sci-pred"),
    pytest.param(boxed("4.6e33"), "4.5e33", 0.0, {}, id="sci-wrong"),
    pytest.param("</think>\\boxed{3} no, \\boxed{4}", "4", 1.0, {}, id="last-box-wins"),
    pytest.param("</think>\\boxed{3} no, \\boxed{4}", "3", 0.0, {}, id="earlier-box-ignored"),
    pytest.param("</think>\\boxed{4} so \\boxed{4", "4", 0.0, {}, id="truncated-last-box"),
    pytest.param("</think>\\fbox{7}", "7", 1.0, {}, id="fbox"),
    pytest.param(boxed(""), "0", 0.0, {}, id="empty-box"),
    pytest.param("</think>The answer is 4.", "4", 0.0, {}, id="missing-box"),
    pytest.param("<think>\\boxed{4}</think> It is 4.", "4", 0.0, {}, id="box-only-in-thought"),
    pytest.param("\\boxed{4}", "4", 0.0, {}, id="no-think-close-gated"),
    pytest.param("\\boxed{4}", "4", 1.0, GATE_OFF, id="no-think-close-ungated"),
    pytest.param("<think>\\boxed{3}</think>\\boxed{4}", "4", 1.0, GATE_OFF, id="ungated-after"),
    pytest.param(boxed("C"), "C", 1.0, {}, id="choice-boxed"),
    pytest.param(boxed("C"), "B", 0.0, {}, id="choice-boxed-wrong"),
    pytest.param(boxed(r"\text{(C)}"), "C", 1.0, {}, id="choice-text-paren"),
    pytest.param(boxed("c"), "C", 1.0, {}, id="choice-lower-case"),
    pytest.param("</think>ANSWER: C", "C", 1.0, {}, id="choice-answer-colon"),
    pytest.param("</think>The answer is (B).", "B", 1.0, {}, id="choice-answer-is"),
    pytest.param("</think>So.\n\nD", "D", 1.0, {}, id="choice-lone-letter"),
    pytest.param("</think>the answer is a function", "A", 0.0, {}, id="choice-article"),
    pytest.param("ANSWER: C", "C", 0.0, {}, id="choice-gated"),
    pytest.param(boxed("2"), "2", 1.0, CHOICE, id="choice-digit-boxed"),
    pytest.param("</think>ANSWER: 3", "3", 1.0, CHOICE, id="choice-digit-answer"),
    pytest.param("</think>ANSWER: 3", "3", 0.0, {}, id="digit-gold-is-math-in-auto"),
    pytest.param(boxed("25"), "025", 1.0, {}, id="aime-zero-padded-gold"),
    pytest.param(boxed("025"), "25", 1.0, {}, id="aime-zero-padded-pred"),
    pytest.param(boxed("250"), "025", 0.0, {}, id="aime-wrong"),
    pytest.param(boxed("142"), "142.0", 1.0, {}, id="amc-float-gold"),
    pytest.param(boxed("142.5"), "142.0", 0.0, {}, id="amc-wrong"),
    pytest.param(
        boxed(r"\frac{\sqrt{3}}{2}"), r"$\frac{\sqrt{3}}{2}$", 1.0, {}, id="olympiad-dollars"
    ),
    pytest.param(boxed("x=2"), "$2$", 1.0, {}, id="assignment-pred"),
    pytest.param(boxed("2"), "x=2", 1.0, {}, id="assignment-gold"),
    pytest.param(boxed("(x+1)^2"), "$x^2+2x+1$", 1.0, {}, id="symbolic"),
    pytest.param(boxed(r"2\sqrt{2}"), r"\sqrt{8}", 1.0, {}, id="radicals"),
    pytest.param(boxed(r"\frac{1}{\sqrt{2}}"), r"\frac{\sqrt{2}}{2}", 1.0, {}, id="rationalised"),
    pytest.param(boxed(r"\pi/2"), r"\frac{\pi}{2}", 1.0, {}, id="pi"),
    # math-verify: a numeric gold is compared after rounding to 6 digits.
    pytest.param(boxed(r"\sqrt{2}"), "1.414", 0.0, {}, id="approx-gold"),
    pytest.param(boxed("1,000"), "1000", 1.0, {}, id="thousands-separator"),
    pytest.param(boxed(r"\$5"), "5", 1.0, {}, id="dollar-sign"),
    pytest.param(boxed("12"), "13", 0.0, {}, id="wrong"),
]


@pytest.fixture(scope="module")
def verifier_for():
    """One verifier per kwargs, shared by the module (workers take ~1 s to start)."""
    cache = {}

    def get(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            # Generous: a loaded CI machine must not turn a slow-but-correct item into a timeout.
            cache[key] = MathVerifyReward(num_workers=1, timeout_s=60.0, **kwargs)
        return cache[key]

    yield get
    for verifier in cache.values():
        verifier.close()


@pytest.fixture(scope="module")
def pool(verifier_for):
    return verifier_for()


@pytest.mark.parametrize(("response", "gold", "expected", "kwargs"), CASES)
def test_case_table(verifier_for, response, gold, expected, kwargs):
    out = verifier_for(**kwargs)([response], [gold])
    assert out.rewards == [expected]
    assert (out.timeouts, out.failures) == (0, 0)


def test_table_in_one_batch_with_two_workers_and_in_process():
    default = [p.values for p in CASES if not p.values[3]]
    responses, golds, expected = ([case[i] for case in default] for i in range(3))
    with MathVerifyReward(num_workers=2, timeout_s=60.0) as two_workers:
        assert two_workers(responses, golds).rewards == expected
    assert MathVerifyReward(num_workers=0, timeout_s=60.0)(responses, golds).rewards == expected


def test_toy_batch_through_math_verify(pool):
    # Speed is measured in benchmarks, not asserted here (shared machines are noisy).
    responses = [boxed(str(i % 20)) for i in range(128)]
    golds = [f"{i % 20}.0" for i in range(128)]  # not string-equal: goes through math-verify
    assert pool(responses, golds).rewards == [1.0] * 128


def run_in_thread(fn):
    """Runs ``fn`` on a non-main thread (like a trainer's helper thread); returns or raises."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=60)
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_pool_works_from_a_thread_in_process_mode_refuses(pool):
    assert run_in_thread(lambda: pool([boxed("0.5")], ["1/2"])).rewards == [1.0]
    in_process = MathVerifyReward(num_workers=0)
    with pytest.raises(RuntimeError, match="main thread"):
        run_in_thread(lambda: in_process([boxed("0.5")], ["1/2"]))


TOWER = boxed("9^{9^{9^{9^{9^{9}}}}}")


def test_hang_hits_library_alarm_and_next_call_works():
    # Library alarm 4 s, outer 8 s: the 4 s of slack keep a loaded machine from letting the
    # outer kill win the race (it is tested on its own below).
    with MathVerifyReward(timeout_s=8.0) as verifier:
        pid = verifier.worker_pids
        start = time.perf_counter()
        out = verifier([TOWER, boxed("2")], ["1", "2"])
        assert time.perf_counter() - start < 30.0
        assert (out.rewards, out.timeouts, out.failures) == ([0.0, 1.0], 1, 0)
        assert verifier([boxed("3")], ["3.0"]).rewards == [1.0]
        assert verifier.worker_pids == pid  # cut by the alarm, no restart needed


def test_outer_timeout_kills_and_replaces_worker():
    with MathVerifyReward(timeout_s=1.5) as verifier:  # library alarm off below 2 s
        pid = verifier.worker_pids
        start = time.perf_counter()
        out = verifier([boxed("2"), TOWER, boxed("4")], ["2", "1", "4.0"])
        assert time.perf_counter() - start < 15.0
        assert (out.rewards, out.timeouts, out.failures) == ([1.0, 0.0, 1.0], 1, 0)
        assert verifier.worker_pids != pid
        assert verifier([boxed("3")], ["3.0"]).rewards == [1.0]


def test_hostile_outputs_finish_in_bounded_time():
    hostile = [
        boxed("2^{2^{40}}"),
        boxed("{" * 10_000 + "1" + "}" * 10_000),
        "</think>" + "x" * 1_000_000 + "\\boxed{" + "1+" * 300_000 + "1}",
        boxed("9" * 1_000_000),
        "</think>" + "\\boxed{" * 100_000,
    ]
    with MathVerifyReward(timeout_s=2.0) as verifier:
        start = time.perf_counter()
        out = verifier(hostile + [boxed("5")], ["1"] * len(hostile) + ["5.0"])
        assert time.perf_counter() - start < 30.0  # ~5 s: four items cut at ~1 s each
        assert out.rewards == [0.0] * len(hostile) + [1.0]


def test_worker_killed_while_idle_is_replaced(pool):
    (pid,) = pool.worker_pids
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":  # wait until dead
        time.sleep(0.01)
    out = pool([boxed("0.5")], ["1/2"])
    assert (out.rewards, out.failures) == ([1.0], 0)
    assert pool.worker_pids != [pid]


def test_worker_killed_mid_item_counts_as_failure():
    with MathVerifyReward(timeout_s=60.0) as verifier:  # only the kill can end the item early
        (pid,) = verifier.worker_pids
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        start = time.perf_counter()
        out = verifier([TOWER, boxed("2")], ["1", "2.0"])
        assert time.perf_counter() - start < 15.0
        assert (out.rewards, out.timeouts, out.failures) == ([0.0, 1.0], 0, 1)


def test_memory_limit_is_set_and_memory_hogs_score_zero():
    with MathVerifyReward(memory_limit_mb=8) as verifier:
        (pid,) = verifier.worker_pids
        with open(f"/proc/{pid}/limits") as f:
            limit = next(line for line in f if line.startswith("Max address space"))
        assert "unlimited" not in limit.split()[3]
        out = verifier([boxed("2^{10^{8}}"), boxed("3")], ["1", "3.0"])  # a 12 MB integer
        assert out.rewards == [0.0, 1.0]


def test_close_leaves_no_child_processes():
    verifier = MathVerifyReward(num_workers=2)
    pids = verifier.worker_pids
    verifier.close()
    verifier.close()  # idempotent
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # reaped: not even a zombie
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="closed"):
        verifier([boxed("1")], ["2"])


def test_hostile_answers_cost_the_trainer_linear_time():
    # Choice and integer grading happen in the trainer process, outside the pool's timeout, as
    # does math mode's normalisation (tests/unit/test_extract.py); each must stay linear.
    from test_extract import HOSTILE_ANSWERS

    texts = list(HOSTILE_ANSWERS.values())
    responses = [f"</think>{t}" for t in texts] + [boxed(t) for t in texts]
    reward = MathVerifyReward(num_workers=0)
    start = time.process_time()
    zeros = [0.0] * len(responses)
    for mode in ("choice", "integer"):
        assert reward(responses, ["A"] * len(responses), [mode] * len(responses)).rewards == zeros
    assert time.process_time() - start < 4.0  # ~0.1 s; the backtracking regexes took minutes


def test_a_preemption_signal_while_a_worker_starts_leaves_it_running(monkeypatch):
    # A scheduler signals every process of the job; a worker that is still importing (seconds:
    # sympy) must not die of it, or the trainer fails before it can save a checkpoint.
    import subprocess

    import relift_pl.rewards.verifier as verifier_lib

    real_popen = subprocess.Popen

    def popen_then_signal(*args, **kwargs):
        proc = real_popen(*args, **kwargs)  # exec'd: the worker's Python is only starting
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGINT)
        return proc

    monkeypatch.setattr(verifier_lib.subprocess, "Popen", popen_then_signal)
    verifier = MathVerifyReward(num_workers=1)
    try:
        assert verifier([boxed(r"\frac{2}{4}")], ["0.5"]).rewards == [1.0]  # math-verify's path
    finally:
        verifier.close()
