"""Loading the policy and its tokenizer through the same ``from_pretrained`` calls users hit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from relift_pl import attention
from relift_pl.config import ConfigError


def resolve_model_path(name_or_path: str | None, build: Callable[[], str | Path] | None = None) -> str:
    """A hub id or local directory, or the directory a ``build`` factory returns (the toy base)."""
    if build is not None:
        return str(build())
    if not name_or_path:
        raise ValueError("model.name_or_path is empty: give a hub id or a local model directory")
    return str(name_or_path)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Left-padding tokenizer (rollouts batch left-padded prompts) with a pad token."""
    try:
        # transformers 5 saves padding_side only when given to from_pretrained.
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, padding_side="left", trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load a tokenizer from {name_or_path!r} (model.name_or_path): {err}"
        ) from err
    # transformers 5 builds an EMPTY tokenizer (no vocabulary) from a model directory without
    # tokenizer files instead of failing: every prompt would encode to nothing.
    if not tokenizer("1+1=2", add_special_tokens=False)["input_ids"]:
        raise ValueError(
            f"{name_or_path!r} (model.name_or_path) holds no tokenizer: transformers built an empty "
            f"one ({len(tokenizer)} tokens). Save the model's tokenizer there (tokenizer.json, "
            "tokenizer_config.json) and retry."
        )
    # A missing chat template is data.chat_template's business (auto / qwen_think render prompts
    # without one): relift_pl.data.templates.resolve_chat_template checks it.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    name_or_path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    config_overrides: dict | None = None,
) -> PreTrainedModel:
    """The trainable causal LM, in ``dtype`` (fp32 on CPU; FSDP casts per its mixed-precision policy).

    ``config_overrides`` change the model's config at load (``model.config_overrides``; the vLLM
    engine gets the same as ``hf_overrides``), e.g. the paper's "16k-think" Qwen2.5-Math-7B:
    ``{max_position_embeddings: 16384, rope_parameters: {rope_type: default, rope_theta: 40000}}``.

    Raises:
        ConfigError: ``config_overrides`` holds ``trust_remote_code`` (``trust_remote_code``
            alone decides whether the model folder's Python files run).
    """
    if "trust_remote_code" in (config_overrides or {}):
        raise ConfigError(
            "model.config_overrides.trust_remote_code would let the model folder run its Python "
            "files: remove it, and set model.trust_remote_code=true instead for a folder you trust"
        )
    kwargs = {"dtype": getattr(torch, dtype), **(config_overrides or {}), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        if attn_implementation == attention.NAME:
            attention.register()
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a causal LM from {name_or_path!r}: {err}") from err
    if not attn_implementation:
        # transformers' sdpa, minus its copies of grouped KV heads on CPU (same numbers).
        attention.prefer_sdpa_gqa(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training forward passes never need the KV cache
    return model.train()  # from_pretrained returns eval mode; Lightning expects train mode


def float32_rotary_frequencies(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the policy's float32 rotary frequencies (``*inv_freq`` buffers): a bf16-true
    precision plugin casts every floating buffer, and rounded frequencies misplace long positions
    (0.63 rad at 512, 10 at 8192 for the 7B's rope dims)."""
    return {
        name: buf.detach().clone() for name, buf in policy.named_buffers()
        if name.endswith("inv_freq") and buf.dtype == torch.float32
    }  # fmt: skip


def restore_float32_buffers(policy: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Puts back the ``saved`` buffers (:func:`float32_rotary_frequencies`) that a precision plugin
    converted."""
    for name, value in saved.items():
        owner, _, attr = name.rpartition(".")
        module = policy.get_submodule(owner)
        if getattr(module, attr).dtype != torch.float32:
            module._buffers[attr] = value.to(getattr(module, attr).device)
