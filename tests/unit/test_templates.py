"""Chat templates: which one renders prompts, the think-opening generation prompt, trace joining."""

from __future__ import annotations

import logging

import pytest

from relift_pl.config import ConfigError
from relift_pl.data.templates import (
    QWEN_THINK_TEMPLATE,
    prompt_text,
    resolve_chat_template,
    response_text,
)
from relift_pl.toy.tokenizer import build_toy_tokenizer

# A stock Qwen2.5-style ChatML template: its generation prompt does not open <think>.
STOCK_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def toy():
    return build_toy_tokenizer()


@pytest.fixture
def stock(toy):
    toy.chat_template = STOCK_CHATML
    return toy


def test_auto_keeps_a_template_that_opens_think(toy):
    assert resolve_chat_template(toy, "auto") is None
    assert prompt_text(toy, "1+2", "ignored by the toy template") == "1+2=<think>"


def test_auto_switches_a_stock_template_to_qwen_think(stock):
    template = resolve_chat_template(stock, "auto")
    assert template == QWEN_THINK_TEMPLATE
    assert prompt_text(stock, "1+2", "Be careful.", template) == (
        "<|im_start|>system\nBe careful.<|im_end|>\n<|im_start|>user\n1+2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    # No system prompt (evaluation): no default system message sneaks in.
    assert prompt_text(stock, "1+2", None, template).startswith("<|im_start|>user\n1+2")


def test_model_keeps_the_stock_template(stock):
    assert resolve_chat_template(stock, "model") is None
    assert prompt_text(stock, "1+2").endswith("<|im_start|>assistant\n")


def test_missing_template(toy):
    toy.chat_template = None
    with pytest.raises(ConfigError, match="data.chat_template=model but"):
        resolve_chat_template(toy, "model")
    assert resolve_chat_template(toy, "auto") == QWEN_THINK_TEMPLATE


# A Llama-2 style template: BOS first, [INST] turns, no <think>.
LLAMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
)


def test_auto_warns_when_chatml_is_foreign_to_the_model(toy, caplog):
    toy.chat_template = LLAMA_LIKE
    toy.bos_token = "<|endoftext|>"
    toy.name_or_path = "org/llama-like"
    with caplog.at_level(logging.INFO, logger="relift_pl.data.templates"):
        assert resolve_chat_template(toy, "auto") == QWEN_THINK_TEMPLATE
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "data.chat_template=auto: 'org/llama-like' has a chat template that does not open "
        "<think>, so prompts use qwen_think (ChatML ending in <think>), foreign to this model: "
        "ChatML's <|im_start|> / <|im_end|> are not tokens of its vocabulary; its own template's "
        "BOS token '<|endoftext|>' is dropped. Set data.chat_template=model to keep the model's "
        "own template, or give a Jinja template that opens <think>."
    )


def test_auto_on_a_chatml_model_only_notes_the_switch(stock, caplog):
    # A Qwen-like tokenizer: ChatML's markers are its own special tokens.
    stock.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    with caplog.at_level(logging.INFO, logger="relift_pl.data.templates"):
        assert resolve_chat_template(stock, "auto") == QWEN_THINK_TEMPLATE
    assert [r.levelno for r in caplog.records] == [logging.INFO]


def test_jinja_string_and_typo(toy):
    assert resolve_chat_template(toy, "{{ messages[-1]['content'] }}!") == "{{ messages[-1]['content'] }}!"
    with pytest.raises(ValueError, match="qwen_thinks.*neither one of model, auto, qwen_think"):
        resolve_chat_template(toy, "qwen_thinks")


def test_response_text_drops_a_think_tag_the_prompt_opened():
    trace = "<think>\nreason\n</think>\n\n\\boxed{1}"
    assert response_text("...assistant\n<think>\n", trace) == "reason\n</think>\n\n\\boxed{1}"
    assert response_text("1+2=<think>", trace) == "\nreason\n</think>\n\n\\boxed{1}"
    # A prompt that does not open the block keeps the trace whole; plain solutions are untouched.
    assert response_text("...assistant\n", trace) == trace
    assert response_text("...<think>\n", "plain\n</think>\\boxed{1}") == "plain\n</think>\\boxed{1}"
