"""Pure string helpers that cut the final answer out of a model response.

Everything that sees model output is linear in the input length (one ``rfind`` plus one forward
scan, or regexes with no nested quantifiers), so a hostile million-character completion costs
milliseconds, and none of it evaluates model output. :func:`normalize_gold` (Python notation)
reads only the benchmarks' own short golds.
"""

from __future__ import annotations

import re

GRADING_MODES = ("math", "choice", "integer", "auto")
"""How an answer is graded (``reward.mode``, or a data row's ``grading``)."""
THINK_CLOSE = "</think>"
THINK_OPEN = "<think>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_SCIENTIFIC = re.compile(r"([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)[eE]([+-]?\d+)")


def split_think(response: str) -> tuple[str | None, str | None]:
    """Splits a response at its LAST ``</think>``.

    Args:
        response: The generated text (the generation prompt usually already opened ``<think>``).

    Returns:
        ``(reasoning, answer_part)``: the text before the last ``</think>`` (a leading ``<think>``
        removed) and the text after it. Both are None when the response has no ``</think>``
        (an unfinished or truncated thought has no answer part).
    """
    cut = response.rfind(THINK_CLOSE)
    if cut < 0:
        return None, None
    reasoning = response[:cut].lstrip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN) :]
    return reasoning, response[cut + len(THINK_CLOSE) :]


_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits: \d would take "٣٨٤" and "３８４" too


def integer_literal(text: str) -> int | None:
    """The integer that ``text`` is, when it is exactly one integer literal (surrounding spaces
    and ``$`` allowed: ``" 27 "``, ``"$-16$"``, ``"+5"``); None for anything else (``12+5+4+6``,
    ``27.0``, ``2 7``, ``\\frac{54}{2}``). The toy worlds' answers are numbers, and an
    expression that evaluates to the gold (the question copied into the box) is not an answer.
    Bounded: a literal of more than 4,300 digits is not one (Python's int() limit)."""
    text = text.strip().strip("$").strip()
    if len(text) > 4300 or not _INTEGER.fullmatch(text):
        return None
    return int(text)


def last_boxed(text: str) -> str | None:
    """Returns the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``.

    Only the last command is considered (as in the reference's ``last_boxed_only_string``): if its
    braces never close (a truncated response) the result is None rather than an earlier box, which
    also keeps the work to a single linear scan.

    Args:
        text: Any string, possibly huge.

    Returns:
        The raw content between the matching braces (escaped ``\\{``/``\\}`` do not count), or None
        when there is no box, no ``{`` after the command, or the braces are unbalanced.
    """
    start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    pos = start + len(command)
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text) or text[pos] != "{":
        return None
    depth = 0
    i = pos
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : i]
        i += 1
    return None


_GREEK = frozenset((
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
    "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "varpi", "rho", "varrho", "sigma",
    "varsigma", "tau", "upsilon", "phi", "varphi", "chi", "psi", "omega", "Gamma", "Delta",
    "Theta", "Lambda", "Xi", "Pi", "Sigma", "Upsilon", "Phi", "Psi", "Omega",
))  # fmt: skip
# A subscript that is one command: L_{\odot}, m_{\max }, L_\odot.
_COMMAND_SUBSCRIPT = re.compile(r"_\s*(?:\{\s*\\([A-Za-z]+)\s*\}|\\([A-Za-z]+))")
# An e or E with a subscript (E_1, E_{2}), not part of a word or a command (\Eta).
_E_SUBSCRIPT = re.compile(r"(?<![\\A-Za-z])([Ee])(?=\s*_)")


def _plain_subscript(match: re.Match) -> str:
    name = match.group(1) or match.group(2)
    return match.group(0) if name in _GREEK else f"_{{{name}}}"


_THOUSANDS = re.compile(r"(?<=\d),\\!(?=\d{3}(?!\d))")


def _strip_dollars(answer: str) -> str:
    """``answer`` without whitespace and the ``$`` pairs around it (by index: linear time)."""
    start, end = 0, len(answer)
    while True:
        while start < end and answer[start].isspace():
            start += 1
        while end > start and answer[end - 1].isspace():
            end -= 1
        if end - start < 2 or answer[start] != "$" or answer[end - 1] != "$":
            return answer[start:end]
        start, end = start + 1, end - 1


def normalize_answer(answer: str) -> str:
    """Strips whitespace and surrounding ``$``, and rewrites what math-verify's parser misreads.

    - ``4.5e33`` becomes ``4.5\\times10^{33}``: math-verify reads it as ``4.5 * e * 33`` (Euler's
      e); Minerva golds use that notation.
    - A subscript that is one non-Greek command loses the backslash (``L_{\\odot}`` ->
      ``L_{odot}``, ``m_{\\max }`` -> ``m_{max}``): the parser gives up on the whole answer.
    - ``E`` (or ``e``) before a subscript becomes ``\\mathsf{E}``: the parser takes ``E`` for
      Euler's number and gives up on ``E_1`` (``\\mathrm`` would not do: math-verify cuts
      ``\\mathrm{...}`` as text).
    - ``t(0,4]`` (a letter, then an interval with mixed brackets) becomes ``t\\in(0,4]``.
    - A thousands separator ``,\\!`` between digits goes: the parser gives up on
      ``\\dfrac{1}{20,\\!000}`` (MATH writes numbers so).

    Golds and predictions both go through it, so the rewritten forms still match each other.
    """
    answer = _strip_dollars(answer)
    answer = _THOUSANDS.sub("", answer)
    sci = _SCIENTIFIC.fullmatch(answer)
    if sci:
        return f"{sci.group(1)}\\times10^{{{sci.group(2)}}}"
    answer = _COMMAND_SUBSCRIPT.sub(_plain_subscript, answer)
    answer = _E_SUBSCRIPT.sub(r"\\mathsf{\1}", answer)
    membership = _MEMBERSHIP.fullmatch(answer)  # "t(0,4]" reads as "t in (0,4]"
    return f"{membership.group(1)}\\in{membership.group(2)}" if membership else answer


# Python notation in golds (Minerva): numpy / math functions and constants, ** powers, "1." floats.
_PY_ATTRIBUTE = re.compile(r"\b(?:np|numpy|math)\.([A-Za-z_]\w*)")
_PY_PLAIN = {
    "pi": r"\pi", "e": "e", "inf": r"\infty", "log": r"\ln", "log10": r"\log_{10}",
    "log2": r"\log_{2}", "asin": r"\arcsin", "acos": r"\arccos", "atan": r"\arctan",
    **{f: f"\\{f}" for f in ("sin", "cos", "tan", "sinh", "cosh", "tanh", "arcsin", "arccos",
                            "arctan", "ln")},  # fmt: skip
}
_PY_WRAPPED = {"sqrt": (r"\sqrt{", "}"), "exp": ("e^{", "}"), "abs": (r"\left|", r"\right|")}
_PY_POWER = re.compile(r"\*\*\s*(?:(-?[\w.]+)|\()")  # x**2, x**(1/3)
_PY_FLOAT = re.compile(r"(?<=\d)\.(?!\d)")  # "1./3", "3.": the point adds nothing
# "\frac{dM}{dt}=...": math-verify compares only an assignment's right side with a bare answer,
# and a derivative on the left is no assignment to it.
_DERIVATIVE_LHS = re.compile(r"\\[dt]?frac\{\s*d[^{}=]*\}\{\s*d[^{}=]*\}\s*=(?!=)")
# "t(0,4]": a variable and an interval (not a call f(0,4), whose brackets are both round). The
# part before the first comma holds no comma, so a match has one split point (linear time).
_MEMBERSHIP = re.compile(r"([A-Za-z])\s*(\([^()\[\],]*,[^()\[\]]*\]|\[[^()\[\],]*,[^()\[\]]*[)\]])")


def _closing_paren(text: str, start: int) -> int:
    """Index of the ``)`` that closes the ``(`` at ``start``; -1 if none (or no ``(`` there)."""
    if text[start : start + 1] != "(":
        return -1
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def _python_to_latex(text: str) -> str:
    """``np.arcsin(10/13)`` -> ``\\arcsin(10/13)``, ``np.sqrt(2)`` -> ``\\sqrt{2}``,
    ``x**(1/3)`` -> ``x^{1/3}``, ``-1./3`` -> ``-1/3``; anything else is left as it is."""
    pos = 0
    while match := _PY_ATTRIBUTE.search(text, pos):
        start, end, name = match.start(), match.end(), match.group(1)
        if name in _PY_PLAIN:
            text = text[:start] + _PY_PLAIN[name] + text[end:]
        elif name in _PY_WRAPPED and (close := _closing_paren(text, end)) > 0:
            left, right = _PY_WRAPPED[name]
            text = text[:start] + left + text[end + 1 : close] + right + text[close + 1 :]
        else:
            pos = end  # not a function we know: left as it is
            continue
        pos = start  # the argument may hold another call
    while match := _PY_POWER.search(text):
        exponent, end = match.group(1), match.end()
        if exponent is None:  # a parenthesised exponent
            close = _closing_paren(text, end - 1)
            if close < 0:
                break
            exponent, end = text[end:close], close + 1
        text = f"{text[: match.start()]}^{{{exponent}}}{text[end:]}"
    return _PY_FLOAT.sub("", text)


# A dollar sign that is not an escaped \$ (money, MATH-500's "\$18.90").
_MATH_DELIMITER = re.compile(r"(?<!\\)\$")


def normalize_gold(gold: str) -> str:
    """:func:`normalize_answer` for a benchmark's gold, which may be written in Python
    (``-1./3``, ``np.arcsin(10/13)``, ``x**2``), as ``t(0,4]`` for "t in (0,4]", or as an
    equation with a derivative on the left (``\\frac{dM}{dt}=...``: only its right side is kept,
    which an answer that repeats the left side still matches).

    Math delimiters inside a gold and a final period are dropped: the parser reads only the first
    piece of ``$221,$8$`` or ``x\\cos t+$ $y``, and ``$(-\\infty,0)\\cup\\{1\\}$.`` is no
    formula."""
    gold = _MATH_DELIMITER.sub(" ", gold.strip().removesuffix(".")).strip()
    gold = _python_to_latex(normalize_answer(gold))
    if derivative := _DERIVATIVE_LHS.match(gold):
        gold = gold[derivative.end() :].strip()
    return gold


_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{(.*)\}$", re.DOTALL)


def _bare_choice(content: str, letters: str) -> str | None:
    """Returns the choice when ``content`` is just one (possibly decorated) choice, else None."""
    content = content.strip().strip("$*").strip()
    match = _TEXT_WRAPPER.match(content)
    if match:
        content = match.group(1).strip()
    content = content.strip("().[] ").rstrip(".:")
    if len(content) == 1 and content.upper() in letters.upper():
        return content.upper()
    return None


def extract_choice_letter(text: str, letters: str = "ABCDE") -> str | None:
    """Extracts a multiple-choice answer from a response (GPQA, ARC-c, MMLU-Pro style).

    Tried in order, the last occurrence winning within each form:
    1. a boxed choice: ``\\boxed{C}``, ``\\boxed{\\text{(C)}}`` (case-insensitive);
    2. ``ANSWER: C``, ``answer is (C)``, ``Answer: $C$`` (the keyword in any case, the choice
       itself upper case: "the answer is a ..." must not read as choice A);
    3. a final non-empty line that is only the choice, e.g. ``C`` or ``(C).``.

    Args:
        text: The answer part of a response (or the whole response).
        letters: The allowed choices, e.g. ``"ABCDE"`` or ``"1234"`` for numbered options.

    Returns:
        The choice in upper case, or None when none of the forms is present.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        choice = _bare_choice(boxed, letters)
        if choice is not None:
            return choice
    allowed = re.escape(letters.upper())
    # Each run of spaces has one place in the pattern (no two quantifiers share it): linear.
    keyword = re.compile(
        rf"(?i:answer)(?:\s+(?i:is))?\s*(?::\s*)?(?:[$*(\[]+\s*)?([{allowed}])(?![A-Za-z0-9])"
    )
    found = None
    for found in keyword.finditer(text):  # noqa: B007 -- keep the last match
        pass
    if found is not None:
        return found.group(1)
    stripped = text.rstrip()
    last_line = stripped[stripped.rfind("\n") + 1 :]
    if len(last_line) <= 32:  # a lone final choice is short; never scan a giant final line
        return _bare_choice(last_line, letters)
    return None
