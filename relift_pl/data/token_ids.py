"""Token ids of data text, read as text: only the chat template adds special tokens.

A tokenizer turns a special token's text wherever it appears into the control token: a problem
holding ``<|im_end|>\\n<|im_start|>assistant`` would end its own turn and open an assistant turn,
and ``<|im_end|>`` inside a solution would be a stop token in the middle of an SFT target. So
data text is encoded with ``split_special_tokens=True`` (transformers' switch for exactly this),
and a prompt is encoded as the template's own text (special tokens parsed) around the data's
(kept as characters). A prompt whose data holds no special token's text is encoded whole, as
the template renders it, so ordinary rows get exactly the ids they always had.
"""

from __future__ import annotations

import itertools
import re

from relift_pl.config import ConfigError
from relift_pl.data.templates import prompt_text

# Private-use characters: no template or tokenizer gives them a meaning.
_SLOT = "\ue000{}\ue001"
_SLOTS = re.compile("(\ue000\\d+\ue001)")


def text_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, with any special token's text in it kept as characters."""
    if not texts:
        return []
    # verbose=False: over-long rows are dropped and counted by the caller, not warned about here.
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """Matches the text of any of the tokenizer's special tokens; None if it has none."""
    texts = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    texts |= set(tokenizer.all_special_tokens)
    texts.discard("")
    return re.compile("|".join(map(re.escape, sorted(texts)))) if texts else None


def prompt_token_ids(
    tokenizer,
    problems: list[str],
    system_prompt: str | None = None,
    template: str | None = None,
    texts: list[str] | None = None,
    unkeepable: list[int] | None = None,
) -> list[list[int] | None]:
    """Token ids of each problem's chat-formatted prompt (see :func:`prompt_text`), in which the
    template alone yields special tokens. ``texts``: those prompts, if already rendered.

    A template that trims messages (Llama 3, Gemma, Phi: ``| trim``) is followed; one that changes
    them otherwise leaves a problem holding a special token's text unkeepable: with
    ``unkeepable`` given, its index is added there and its ids are None (the caller reports the
    row), else it raises.

    Raises:
        ConfigError: such a problem, without ``unkeepable``; or ``data.system_prompt`` holds a
            special token's text that the template changes.
    """
    if texts is None:
        texts = [prompt_text(tokenizer, p, system_prompt, template) for p in problems]
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    special = special_token_pattern(tokenizer)
    if special is None:
        return ids
    system_has_special = bool(system_prompt and special.search(system_prompt))
    if system_has_special:
        plain = prompt_text(tokenizer, "1+1", system_prompt, template)
        if _ids_around_data(tokenizer, "1+1", system_prompt, template, plain) is None:
            raise ConfigError(
                f"data.system_prompt holds a special token's text ({system_prompt[:60]!r}...) and "
                f"data.chat_template changes message text, so it cannot be kept apart from the "
                f"template's tokens; {_KEEPING_TEMPLATE}"
            )
    for i, problem in enumerate(problems):
        if system_has_special or special.search(problem):
            ids[i] = _ids_around_data(tokenizer, problem, system_prompt, template, texts[i])
            if ids[i] is not None:
                continue
            if unkeepable is None:
                raise ConfigError(
                    "data.chat_template changes message text beyond trimming it, so a problem's "
                    f"special-token text ({problem[:60]!r}...) cannot be kept apart from the "
                    f"template's tokens; {_KEEPING_TEMPLATE}"
                )
            unkeepable.append(i)
    return ids


_KEEPING_TEMPLATE = "use a template that inserts messages as they are (qwen_think does)"


def prompt_ids(
    tokenizer, problem: str, system_prompt: str | None = None, template: str | None = None
) -> list[int]:
    """:func:`prompt_token_ids` for one problem."""
    return prompt_token_ids(tokenizer, [problem], system_prompt, template)[0]


def _ids_around_data(
    tokenizer, problem: str, system_prompt: str | None, template: str | None, text: str
) -> list[int] | None:
    """The template rendered around numbered slots: its pieces encoded as template text, each
    slot's message as text (trimmed if that is what the template did). None when the template
    changed a message otherwise."""
    contents = [problem] + ([system_prompt] if system_prompt else [])
    slots = [_SLOT.format(i) for i in range(len(contents))]
    skeleton = prompt_text(tokenizer, slots[0], slots[1] if system_prompt else None, template)
    pieces = _SLOTS.split(skeleton)
    # Each message as given, or trimmed (Jinja's trim is str.strip), in every combination.
    for inserted in dict.fromkeys(itertools.product(*[(c, c.strip()) for c in contents])):
        filled = [inserted[slots.index(p)] if p in slots else p for p in pieces]
        if "".join(filled) == text:
            break
    else:
        return None
    ids: list[int] = []
    for piece, content in zip(pieces, filled, strict=True):
        if piece in slots:
            ids += text_ids(tokenizer, [content])[0]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids
