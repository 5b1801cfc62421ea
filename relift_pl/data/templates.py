"""Prompt and demonstration formatting through a chat template.

The chat template (not hand-written strings) decides the format, so the policy sees the same
prompt at train and eval time. ``chat_template`` picks it:

- ``model``: the tokenizer's own template;
- ``qwen_think``: ChatML whose generation prompt ends with ``<think>\\n``, the reference's
  "16k-think" Qwen2.5-Math template (stock Qwen templates do not open a think block);
- ``auto``: the tokenizer's own template if its generation prompt already ends with
  ``<think>``, else ``qwen_think``;
- any other string: a Jinja chat template, used as is.
"""

from __future__ import annotations

from typing import Any

from relift_pl.config import ConfigError
from relift_pl.quiet import rank_zero_logger
from relift_pl.rewards.extract import THINK_OPEN

log = rank_zero_logger(__name__)  # every rank loads the same rows: rank 0 says so

# Unlike the stock Qwen templates, no default system message when none is given: evaluation
# drops the system prompt, as the reference does.
QWEN_THINK_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)
NAMED_TEMPLATES = {"qwen_think": QWEN_THINK_TEMPLATE}


def _render(tokenizer, messages: list[dict[str, Any]], template: str | None) -> str:
    kwargs = {"chat_template": template} if template is not None else {}
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **kwargs
    )


def check_chat_template_name(chat_template: str) -> None:
    """A name in :data:`NAMED_TEMPLATES`, ``model``, ``auto`` or a Jinja string (no tokenizer needed)."""
    if chat_template in ("model", "auto", *NAMED_TEMPLATES):
        return
    if "{{" not in chat_template and "{%" not in chat_template:
        names = ", ".join(["model", "auto", *NAMED_TEMPLATES])
        raise ConfigError(
            f"data.chat_template={chat_template!r} is neither one of {names} nor a Jinja template"
        )


def resolve_chat_template(tokenizer, chat_template: str = "model") -> str | None:
    """The Jinja template to render prompts with; None means the tokenizer's own.

    Args:
        tokenizer: the policy's tokenizer.
        chat_template: ``model``, ``auto``, a name in :data:`NAMED_TEMPLATES`, or Jinja.
    """
    check_chat_template_name(chat_template)
    if chat_template not in ("model", "auto"):
        return NAMED_TEMPLATES.get(chat_template, chat_template)
    own = getattr(tokenizer, "chat_template", None)
    name = getattr(tokenizer, "name_or_path", "") or "the model"
    if chat_template == "model":
        if own is None:
            raise ConfigError(
                f"data.chat_template=model but the tokenizer of {name!r} has no chat_template: set "
                "data.chat_template=auto or qwen_think (ChatML opening <think>), or a Jinja string"
            )
        return None
    if own is not None:
        opened = _render(tokenizer, [{"role": "user", "content": "x"}], None)
        if opened.rstrip().endswith(THINK_OPEN):
            return None
    _explain_auto_fallback(tokenizer, name, own)
    return QWEN_THINK_TEMPLATE


def _explain_auto_fallback(tokenizer, name: str, own: str | None) -> None:
    """Says when ``auto``'s ChatML is foreign to the model (Llama, Mistral): a silent format change."""
    lost = []
    if tokenizer.convert_tokens_to_ids("<|im_start|>") in (None, tokenizer.unk_token_id):
        lost.append("ChatML's <|im_start|> / <|im_end|> are not tokens of its vocabulary")
    bos = getattr(tokenizer, "bos_token", None)
    if own is not None and bos and _render(tokenizer, [{"role": "user", "content": "x"}], None).startswith(bos):
        lost.append(f"its own template's BOS token {bos!r} is dropped")
    why = "has no chat template" if own is None else "has a chat template that does not open <think>"
    if not lost:  # a ChatML model (Qwen): qwen_think is its own format plus the think tag
        log.info("%s %s: data.chat_template=auto uses qwen_think", name, why)
        return
    log.warning(
        "data.chat_template=auto: %r %s, so prompts use qwen_think (ChatML ending in <think>), "
        "foreign to this model: %s. Set data.chat_template=model to keep the model's own "
        "template, or give a Jinja template that opens <think>.", name, why, "; ".join(lost),
    )


def prompt_text(
    tokenizer, problem: str, system_prompt: str | None = None, template: str | None = None
) -> str:
    """The chat-formatted prompt, ending with the generation prompt.

    Args:
        tokenizer: the policy's tokenizer.
        problem: the user turn.
        system_prompt: a system message (training only; evaluation passes None).
        template: a Jinja template from :func:`resolve_chat_template`; None for the tokenizer's.
    """
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": problem})
    return _render(tokenizer, messages, template)


def response_text(prompt: str, demonstration: str) -> str:
    """The demonstration as a continuation of ``prompt``.

    A trace that opens with ``<think>`` (R1 style) loses that tag when the generation prompt has
    already opened it, as in the reference's dataset (no doubled ``<think>``).
    """
    body = demonstration.lstrip()
    if prompt.rstrip().endswith(THINK_OPEN) and body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN) :]
        # The prompt's own whitespace after <think> stands in for the trace's.
        return body.lstrip() if prompt != prompt.rstrip() else body
    return demonstration
