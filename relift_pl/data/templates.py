"""Prompt and demonstration formatting through the tokenizer's own chat template."""

from __future__ import annotations

from typing import Any


def prompt_ids(tokenizer, problem: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the generation prompt.

    The chat template (not hand-written strings) decides the format, so a model's own template,
    such as Qwen-math's ``<think>``-ending one, is what the policy sees at train and eval time.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template: set one "
            "in its tokenizer_config.json or pick a model directory that ships one"
        )
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": problem})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def demonstration_ids(tokenizer, demonstration: str) -> list[int]:
    """Token ids of a demonstration response, EOS appended so SFT teaches the model to stop."""
    ids = tokenizer(demonstration, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]
