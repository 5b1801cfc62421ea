"""Token log-probabilities and entropies of a causal LM, under the sampling temperature.

Log-probs of sampled tokens must be computed from logits / temperature, the distribution the tokens
were actually drawn from (vLLM and Hugging Face generate both divide before sampling); forgetting it
biases the importance ratio of GRPO (Shao et al. 2024) whenever temperature != 1.

Memory: the vocabulary projection dominates. `policy_logprobs` asks the model for the last R + 1
positions only (`logits_to_keep`), and the helpers upcast to float32 per row chunk rather than
materialising a full [N, T, V] float32 log-softmax. Log-probs and entropies come from one
logsumexp and at most one softmax (`logprobs_and_entropy`); an entropy that only feeds metrics is
computed without autograd, so nothing of it is kept for the backward pass.

Shared prompts (GRPO's G samples of one prompt): `policy_logprobs(share_prompts=True)` runs each
distinct prompt once, keeps its key/value cache, and runs only the responses against copies of
that cache. The result is the same function of the weights (same values and gradients up to
float32 rounding: the tests hold them to 1e-5); the prompt tokens' forward and backward cost drops
by a factor G.

Token-chunked head (`policy_logprobs(token_chunk=N)`): the model's LM head is replaced, for the
forward, by `FusedLogprobHead`, which turns the final hidden states into per-token log-probs and
entropies N tokens at a time (`fused_head.py`); no [tokens, vocab] tensor is kept for backward and
at most N rows of it exist at once. Same values and gradients; works under FSDP2 (the head runs
inside the root module's forward) and with `share_prompts`. Models whose forward post-processes
the logits fall back to the full-logits path with a warning.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import Tensor, nn

from relift_pl.algorithms.head_swap import (
    FusedLogprobHead,
    HeadSlot,
    find_lm_head,
    replaced_lm_head,
)


def _scaled_float(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature in float32; no copy when already float32 and temperature == 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[label], as label logit minus logsumexp.

    Args:
        logits: [N, T, V] unnormalised scores (any float dtype; computed in float32).
        labels: [N, T] token ids.
        temperature: sampling temperature, > 0.

    Returns:
        [N, T] float32 log-probs, differentiable w.r.t. `logits`.
    """
    scaled = _scaled_float(logits, temperature)  # [N, T, V]
    label_logits = scaled.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [N, T]
    return label_logits - torch.logsumexp(scaled, dim=-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature): logsumexp(x) - sum(softmax(x) * x).

    Args:
        logits: [N, T, V] unnormalised scores (any float dtype; computed in float32).
        temperature: sampling temperature, > 0.

    Returns:
        [N, T] float32 entropies in nats, differentiable w.r.t. `logits`.
    """
    scaled = _scaled_float(logits, temperature)  # [N, T, V]
    probs = torch.softmax(scaled, dim=-1)  # [N, T, V]
    return torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(dim=-1)


def logprobs_and_entropy(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, *, entropy: str | None = "grad"
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `labels` and the entropy, from one logsumexp and at most one softmax.

    Equal to (`logprobs_from_logits`, `entropy_from_logits`) without computing the logsumexp twice
    or keeping a second [N, T, V] float32 softmax alive.

    Args:
        logits: [N, T, V] unnormalised scores (any float dtype; computed in float32).
        labels: [N, T] token ids.
        temperature: sampling temperature, > 0.
        entropy: ``"grad"`` (differentiable entropy, for an entropy bonus), ``"no_grad"``
            (computed without autograd: for metrics only, nothing saved for backward) or None.

    Returns:
        (logprobs [N, T] float32 differentiable w.r.t. `logits`, entropy [N, T] float32 or None).
    """
    if entropy not in ("grad", "no_grad", None):
        raise ValueError(f"entropy must be 'grad', 'no_grad' or None, got {entropy!r}")
    scaled = _scaled_float(logits, temperature)  # [N, T, V]
    lse = torch.logsumexp(scaled, dim=-1)  # [N, T]
    logprobs = scaled.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse  # [N, T]
    if entropy is None:
        return logprobs, None
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy == "grad"):
        probs = torch.exp(scaled - lse.unsqueeze(-1))  # [N, T, V] the one softmax
        ent = lse - (probs * scaled).sum(dim=-1)  # [N, T]
    return logprobs, ent


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[N, L] position ids of left-padded rows: each row's first real token is at 0, as in
    Hugging Face generate (padding positions are clamped to 0 and masked anyway)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """True if the model's forward takes `logits_to_keep` by name (HF Qwen2, Llama, ...)."""
    return "logits_to_keep" in _forward_params(model)


def _can_share_prompts(model: nn.Module) -> bool:
    """A Hugging Face model that takes and fills a KV cache under training (no recompute)."""
    params = _forward_params(model)
    return (
        {"past_key_values", "logits_to_keep"} <= params
        and not getattr(model, "is_gradient_checkpointing", False)  # HF then drops the cache
    )


class _FusedHeads:
    """Builds the `FusedLogprobHead` of each forward pass of one `policy_logprobs` call."""

    def __init__(
        self,
        slot: HeadSlot,
        labels: Tensor,
        label_mask: Tensor,
        temperature: float,
        token_chunk: int,
        entropy: str | None,
    ) -> None:
        self.slot, self.labels, self.label_mask = slot, labels, label_mask
        self.options = {"temperature": temperature, "token_chunk": token_chunk, "entropy": entropy}

    def run(
        self,
        model: nn.Module,
        columns: slice,
        drop_last: int = 0,
        rows: Tensor | None = None,
        **inputs,
    ):
        """One model forward whose `.logits` are [N, r, 2]: (log-prob, entropy) of the labels in
        `columns` (see `FusedLogprobHead` for `drop_last` and `rows`)."""
        head = FusedLogprobHead(
            self.slot.lm_head, self.labels[:, columns], self.label_mask[:, columns],
            drop_last=drop_last, rows=rows, **self.options,
        )  # fmt: skip
        with replaced_lm_head(self.slot, head):
            out = model(**inputs)
        head.check_output(out.logits)
        return out


def _shared_prompt_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    num_response_tokens: int,
    fused: _FusedHeads | None = None,
) -> Tensor | None:
    """[N, R, V] logits predicting the response tokens, each distinct prompt run once.

    Pass 1 runs the U distinct (prompt ids, prompt mask) rows and keeps their KV cache and the
    logits of their last position (which predict the first response token). The cache rows are
    then gathered out to the N sequences (a differentiable index: gradients of the copies add up
    in the shared prompt), and pass 2 runs the response tokens but the last against it.
    With `fused`, each pass returns [N, r, 2] (log-prob, entropy) instead of logits, so the result
    is [N, R, 2]. Returns None when sharing does not apply (no repeated prompt, or the cache was
    not filled).
    """
    from transformers import DynamicCache

    num_rows, seq_len = input_ids.shape
    prompt_len = seq_len - num_response_tokens
    prompt_block = torch.cat([input_ids[:, :prompt_len], attention_mask[:, :prompt_len]], dim=1)
    unique, inverse = torch.unique(prompt_block, dim=0, return_inverse=True)  # [U, 2P], [N]
    if unique.shape[0] == num_rows:
        return None
    unique_ids, unique_mask = unique[:, :prompt_len], unique[:, prompt_len:]
    unique_positions = position_ids_from_mask(unique_mask)
    inverse = inverse.to(input_ids.device)
    cache = DynamicCache()
    first_inputs = {
        "input_ids": unique_ids, "attention_mask": unique_mask, "position_ids": unique_positions,
        "past_key_values": cache, "use_cache": True, "logits_to_keep": 1,
    }  # fmt: skip
    if fused is None:
        first = model(**first_inputs)
        first_logits = first.logits[:, -1:][inverse]  # [N, 1, V]
    else:  # the head gathers the U hidden rows out to the N labels itself
        first = fused.run(model, slice(0, 1), rows=inverse, **first_inputs)
        first_logits = first.logits  # [N, 1, 2]
    cache = first.past_key_values if first.past_key_values is not None else cache
    if cache.get_seq_length() != prompt_len:  # the model did not fill the cache: no sharing
        return None
    cache.batch_select_indices(inverse)
    if num_response_tokens == 1:
        return first_logits
    rest_inputs = {
        "input_ids": input_ids[:, prompt_len:-1],
        "attention_mask": attention_mask[:, :-1],
        "position_ids": position_ids[:, prompt_len:-1],
        "past_key_values": cache,
        "use_cache": True,
    }
    if fused is None:
        rest = model(**rest_inputs).logits  # [N, R - 1, V]
    else:
        rest = fused.run(model, slice(1, None), **rest_inputs).logits  # [N, R - 1, 2]
    return torch.cat([first_logits, rest], dim=1)  # [N, R, V] or [N, R, 2]


def policy_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_response_tokens: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    chunk_size: int | None = None,
    share_prompts: bool = False,
    token_chunk: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) of the response tokens under a Hugging Face causal LM.

    Sequences are laid out as [left-padded prompt | right-padded response]; the logits at positions
    P-1 .. P+R-2 predict the response tokens at P .. P+R-1. Position ids come from
    `position_ids_from_mask`, so each sequence's first real token is at position 0 whatever its
    left padding, as in Hugging Face generate. Values at padding positions of
    the response are garbage (0 with `token_chunk`) and must be masked by the caller.

    Args:
        model: a Hugging Face causal LM returning `.logits`.
        input_ids: [N, P + R] token ids.
        attention_mask: [N, P + R] 1 on real tokens, 0 on padding.
        num_response_tokens: R, the width of the response block (1 <= R < P + R).
        temperature: sampling temperature the responses were drawn with.
        with_entropy: also return the per-position entropy.
        entropy_grad: the entropy is differentiable (an entropy bonus); False computes it without
            autograd, for metrics only.
        chunk_size: rows of the [N, R, V] log-prob/entropy computation handled at once (bounds the
            float32 temporaries, not what is saved for backward); None processes all rows
            together. Unused with `token_chunk`.
        share_prompts: run each distinct prompt once and the responses against its KV cache
            (same values and gradients; see the module docstring). Falls back to one pass when no
            prompt repeats or the model cannot (no KV cache in training, gradient checkpointing).
        token_chunk: compute log-probs and entropies inside the model's forward from its final
            hidden states, this many (real) response tokens at a time, recomputing each chunk's
            logits in backward (see `fused_head.py`): no [N, R, V] logits exist. None: the model
            returns full logits. Falls back to that, with a warning, for models whose forward
            post-processes its logits.

    Returns:
        (logprobs [N, R] float32, entropy [N, R] float32 or None).
    """
    num_rows, seq_len = input_ids.shape
    if not 1 <= num_response_tokens < seq_len:
        raise ValueError(
            f"num_response_tokens must be in [1, {seq_len - 1}] (at least one prompt token), "
            f"got {num_response_tokens}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if token_chunk is not None and token_chunk < 1:
        raise ValueError(f"token_chunk must be >= 1, got {token_chunk}")
    position_ids = position_ids_from_mask(attention_mask)  # [N, P + R]
    labels = input_ids[:, -num_response_tokens:]  # [N, R]
    entropy_mode = ("grad" if entropy_grad else "no_grad") if with_entropy else None
    fused = None
    if token_chunk is not None:
        slot, reason = find_lm_head(model)
        if slot is None:
            warnings.warn(
                f"token_chunk={token_chunk} not applied ({reason}): full logits computed",
                stacklevel=2,
            )
        else:
            label_mask = attention_mask[:, -num_response_tokens:].bool()  # [N, R] real labels
            fused = _FusedHeads(slot, labels, label_mask, temperature, token_chunk, entropy_mode)
    logits = None
    if share_prompts and _can_share_prompts(model):
        logits = _shared_prompt_logits(
            model, input_ids, attention_mask, position_ids, num_response_tokens, fused
        )  # [N, R, V] ([N, R, 2] when fused) or None
    if logits is None:
        kwargs = {
            "input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": position_ids, "use_cache": False,
        }  # fmt: skip
        if _accepts_logits_to_keep(model):
            # Skip the prompt's vocabulary projection: keep the R + 1 last positions, drop the last.
            kwargs["logits_to_keep"] = num_response_tokens + 1
        if fused is not None:  # the head scores the R positions before the last
            logits = fused.run(model, slice(None), drop_last=1, **kwargs).logits  # [N, R, 2]
        else:
            logits = model(**kwargs).logits  # [N, R + 1, V] or [N, P + R, V]
            logits = logits[:, -(num_response_tokens + 1) : -1]  # [N, R, V]
    if fused is not None:
        return logits[..., 0], (logits[..., 1] if with_entropy else None)

    step = chunk_size or max(num_rows, 1)
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, num_rows, step):
        chunk = logits[start : start + step]  # [n, R, V]
        chunk_logprobs, chunk_entropy = logprobs_and_entropy(
            chunk, labels[start : start + step], temperature, entropy=entropy_mode
        )
        logprob_chunks.append(chunk_logprobs)
        if with_entropy:
            entropy_chunks.append(chunk_entropy)
    logprobs = torch.cat(logprob_chunks, dim=0)  # [N, R]
    entropy = torch.cat(entropy_chunks, dim=0) if with_entropy else None  # [N, R]
    return logprobs, entropy
