"""Which tokens end a response: one list for sampling (both engines), decoding and export.

A base model's ``generation_config`` often names only its pretraining end-of-text token
(Qwen2.5-Math: ``<|endoftext|>``), while the chat template the prompts are rendered with closes
each turn with another (``<|im_end|>``). A policy that ends its turn with the template's token must
stop there: otherwise it samples on past the end of its answer up to ``max_new_tokens``, and the
reward reads whatever follows.
"""

from __future__ import annotations

import torch

# End-of-turn tokens of the chat formats the data module renders (ChatML for Qwen's templates,
# Llama 3's); one counts when the template in use writes it and the tokenizer has it as one token.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>")


def stop_token_ids(generation_eos, tokenizer, template: str | None = None) -> list[int]:
    """The model's generation EOS ids, the tokenizer's EOS, and the template's end-of-turn token.

    Args:
        generation_eos: ``generation_config.eos_token_id`` (an int, a list, or None).
        tokenizer: the policy's tokenizer.
        template: the Jinja chat template prompts are rendered with (None: the tokenizer's own).

    Returns:
        Distinct token ids, generation config first.
    """
    ids: list[int] = []
    if generation_eos is not None:
        ids += [generation_eos] if isinstance(generation_eos, int) else list(generation_eos)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    text = template if template is not None else (getattr(tokenizer, "chat_template", None) or "")
    if not isinstance(text, str):  # a dict of named templates
        text = " ".join(str(t) for t in text.values()) if isinstance(text, dict) else ""
    for token in END_OF_TURN:
        if token in text:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != tokenizer.unk_token_id:
                ids.append(token_id)
    return list(dict.fromkeys(ids))


def apply_stop_tokens(policy, tokenizer, template: str | None = None) -> list[int]:
    """Sets ``policy.generation_config.eos_token_id`` to :func:`stop_token_ids` (what both rollout
    engines and the exported model read) and returns the list."""
    ids = stop_token_ids(policy.generation_config.eos_token_id, tokenizer, template)
    policy.generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]
    return ids


def decode_responses(batch, tokenizer, generation_eos) -> list[str]:
    """Response texts of a ``RolloutBatch``: the masked tokens without the stop tokens, in one
    batched decode.

    Args:
        batch: the rollouts.
        tokenizer: the policy's tokenizer.
        generation_eos: the policy's ``generation_config.eos_token_id``.
    """
    # Every id that ends a response (the engines stop on all of them), not only the tokenizer's.
    stops = torch.tensor(stop_token_ids(generation_eos, tokenizer, template=""))
    keep = batch.response_mask.bool() & ~torch.isin(batch.response_ids, stops)
    flat = batch.response_ids[keep].tolist()  # row-major: each row's kept tokens in order
    ends = keep.sum(-1).cumsum(0).tolist()
    rows = [flat[start:end] for start, end in zip([0, *ends[:-1]], ends)]
    return tokenizer.batch_decode(rows, skip_special_tokens=False)
