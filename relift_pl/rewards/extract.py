"""Pure string helpers that cut the final answer out of a model response.

Everything here is linear in the input length (one ``rfind`` plus one forward scan, or regexes with
no nested quantifiers), so a hostile million-character completion costs milliseconds, and none of
it evaluates model output.
"""

from __future__ import annotations

import re

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


def normalize_answer(answer: str) -> str:
    """Strips whitespace and surrounding ``$``; rewrites ``4.5e33`` as ``4.5\\times10^{33}``.

    math-verify reads ``4.5e33`` as ``4.5 * e * 33`` (Euler's e); Minerva golds use that notation.
    """
    answer = answer.strip()
    while len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
        answer = answer[1:-1].strip()
    sci = _SCIENTIFIC.fullmatch(answer)
    return f"{sci.group(1)}\\times10^{{{sci.group(2)}}}" if sci else answer


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
    keyword = re.compile(
        rf"(?i:answer)(?:\s+(?i:is))?\s*:?\s*[$*(\[]*\s*([{allowed}])(?![A-Za-z0-9])"
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
