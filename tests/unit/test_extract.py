"""Answer extraction: pure string functions, including bounded work on hostile input."""

import time

import pytest

from relift_pl.rewards.extract import (
    extract_choice_letter,
    last_boxed,
    normalize_answer,
    normalize_gold,
    split_think,
)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>\nreason</think>answer", ("\nreason", "answer")),
        ("reason</think>answer", ("reason", "answer")),
        ("a</think>b</think>c", ("a</think>b", "c")),  # the LAST </think> splits
        ("no close tag \\boxed{1}", (None, None)),
        ("</think>", ("", "")),
    ],
)
def test_split_think(response, expected):
    assert split_think(response) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{17}.", "17"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed{1} and \fbox{8}", "8"),
        (r"\boxed {5}", "5"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
        (r"\boxed{a\\}", "a\\\\"),  # an escaped backslash does not escape the brace
        (r"\boxed{}", ""),
        (r"\boxed{4} then \boxed{4", None),  # truncated last box: None, not the earlier one
        (r"\boxed 5", None),
        ("no box at all", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_hostile_inputs_are_linear():
    nested = "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"
    many_open = "\\boxed{" * 100_000
    huge = "x" * 1_000_000 + "\\boxed{" + "1+" * 300_000 + "1}"
    start = time.perf_counter()
    assert last_boxed(nested) == "{" * 10_000 + "1" + "}" * 10_000
    assert last_boxed(many_open) is None
    assert last_boxed(huge).startswith("1+1+")
    assert last_boxed("}" * 1_000_000) is None
    # A bound against quadratic/backtracking scans (minutes), not a speed target (~0.3 s).
    assert time.perf_counter() - start < 30.0


@pytest.mark.parametrize(
    ("text", "letters", "expected"),
    [
        (r"\boxed{C}", "ABCDE", "C"),
        (r"\boxed{\text{(B)}}", "ABCDE", "B"),
        (r"\boxed{c}", "ABCDE", "C"),
        ("ANSWER: C", "ABCDE", "C"),
        ("Answer: $D$", "ABCDE", "D"),
        ("so the answer is (B).", "ABCDE", "B"),
        ("The answer is A, not B... final answer: E", "ABCDE", "E"),
        ("Reasoning.\n\n**D**", "ABCDE", "D"),
        ("Reasoning.\n(A).\n", "ABCDE", "A"),
        ("the answer is a function of x", "ABCDE", None),  # lower-case article, not choice A
        ("Vitamin B is involved", "ABCDE", None),
        ("ANSWER: F", "ABCDE", None),
        (r"\boxed{3}", "1234", "3"),
        ("ANSWER: 2", "1234", "2"),
        ("", "ABCDE", None),
    ],
)
def test_extract_choice_letter(text, letters, expected):
    assert extract_choice_letter(text, letters) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (" $x$ ", "x"),
        ("$$\\frac{1}{2}$$", "\\frac{1}{2}"),
        ("4.5e33", "4.5\\times10^{33}"),
        ("-2E-3", "-2\\times10^{-3}"),
        ("e3", "e3"),  # not a number in scientific notation
        ("025", "025"),
        # Subscripts the parser gives up on.
        (r"L_{\odot}", "L_{odot}"),
        (r"m_{\max }=1", "m_{max}=1"),
        (r"L_\odot", "L_{odot}"),
        (r"\rho_{\alpha}", r"\rho_{\alpha}"),  # Greek subscripts parse: left alone
        ("E_1+e_{2}", r"\mathsf{E}_1+\mathsf{e}_{2}"),
        (r"E+\Eta_1+BE_1", r"E+\Eta_1+BE_1"),  # no subscript, a command, inside a word
        (r"\dfrac{1}{29,\!322,\!216}", r"\dfrac{1}{29322216}"),  # MATH's thousands separator
        (r"1,\!0000", r"1,\!0000"),  # not a thousands separator
        ("$ $ x $ $", "x"),
    ],
)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        ("-1./3", "-1/3"),
        ("3.", "3"),
        ("142.0", "142.0"),
        ("np.arcsin(10/13)", r"\arcsin(10/13)"),
        ("2*np.pi", r"2*\pi"),
        ("math.sqrt(np.exp(2))", r"\sqrt{e^{2}}"),
        ("np.foo(2)", "np.foo(2)"),  # not a function we know
        ("x**2", "x^{2}"),
        ("2**-10", "2^{-10}"),
        ("x**(1/3)+1", "x^{1/3}+1"),
        ("$t(0,4]$", r"t\in(0,4]"),
        ("x[1,2)", r"x\in[1,2)"),
        ("f(0,4)", "f(0,4)"),  # a call, not an interval
        (r"\frac{dM}{dt}=M^{2}", "M^{2}"),
        (r"\frac{a}{b}=2", r"\frac{a}{b}=2"),  # not a derivative
    ],
)
def test_normalize_gold(gold, expected):
    assert normalize_gold(gold) == expected


def test_an_answer_written_like_the_interval_gold_still_matches_it():
    # olympiadbench-0096's gold "t(0,4]" is read as t in (0,4]; an answer copying the gold's own
    # notation must be read the same way (it scored 1 before the gold was normalised).
    from relift_pl.rewards import MathVerifyReward

    assert normalize_answer("t(0,4]") == "t\\in(0,4]"
    assert normalize_answer("f(0,4)") == "f(0,4)"  # a call, not an interval
    with MathVerifyReward(num_workers=0) as reward:
        scored = reward(["</think>\\boxed{t(0,4]}", "</think>\\boxed{t(0,5]}"], ["t(0,4]", "t(0,4]"])
    assert scored.rewards == [1.0, 0.0]


# 100k-character answers that made a regex backtrack (issue 28): seconds to minutes each.
HOSTILE_ANSWERS = {
    "membership, round, commas": "a(" + "," * 100_000,
    "membership, square, commas": "a[" + "," * 100_000,
    "unclosed list": "t[" + "1," * 50_000,
    "keyword, spaces": "answer" + " " * 100_000 + "x",
    "keyword, newlines": "the answer" + "\n" * 100_000,
    "keyword, colon, spaces": "answer:" + " " * 50_000 + "$" * 50_000,
    "subscript command": "_{\\" + "a" * 100_000,
    "e subscript": "E" + " " * 100_000,
    "scientific": "1" * 100_000 + "e",
    "dollar pairs": "$" * 100_000,
    "spaced dollar pairs": "$ " * 50_000,
}


@pytest.mark.parametrize("name", HOSTILE_ANSWERS)
def test_answer_helpers_are_linear_on_hostile_input(name):
    text = HOSTILE_ANSWERS[name]
    start = time.process_time()  # CPU time: other processes on the machine do not count
    for function in (split_think, last_boxed, normalize_answer, extract_choice_letter):
        function(text)
        function(f"</think>\\boxed{{{text}}}")
    # Linear work is ~10 ms here; the backtracking regexes took 2 s to hours.
    assert time.process_time() - start < 2.0
