"""Token log-probabilities and entropies of a causal LM, under the sampling temperature.

Log-probs of sampled tokens must be computed from logits / temperature, the distribution the tokens
were actually drawn from (vLLM and Hugging Face generate both divide before sampling); forgetting it
biases the importance ratio of GRPO (Shao et al. 2024) whenever temperature != 1.

Memory: the vocabulary projection dominates. `policy_logprobs` asks the model for the last R + 1
positions only (`logits_to_keep`), and the helpers upcast to float32 per row chunk rather than
materialising a full [N, T, V] float32 log-softmax.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


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


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """True if the model's forward takes `logits_to_keep` by name (HF Qwen2, Llama, ...)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def policy_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    num_response_tokens: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) of the response tokens under a Hugging Face causal LM.

    Sequences are laid out as [left-padded prompt | right-padded response]; the logits at positions
    P-1 .. P+R-2 predict the response tokens at P .. P+R-1. Position ids are
    (attention_mask.cumsum(-1) - 1).clamp(min=0), so each sequence's first real token is at
    position 0 whatever its left padding, as in Hugging Face generate. Values at padding positions of
    the response are garbage and must be masked by the caller.

    Args:
        model: a Hugging Face causal LM returning `.logits`.
        input_ids: [N, P + R] token ids.
        attention_mask: [N, P + R] 1 on real tokens, 0 on padding.
        num_response_tokens: R, the width of the response block (1 <= R < P + R).
        temperature: sampling temperature the responses were drawn with.
        with_entropy: also return the per-position entropy.
        chunk_size: rows of the [N, R, V] log-prob/entropy computation handled at once (bounds the
            float32 temporaries); None processes all rows together.

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
    position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # [N, P + R]
    kwargs = {}
    if _accepts_logits_to_keep(model):
        # Skip the prompt's vocabulary projection: keep the R + 1 last positions, drop the last.
        kwargs["logits_to_keep"] = num_response_tokens + 1
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **kwargs,
    ).logits  # [N, R + 1, V] or [N, P + R, V]
    logits = logits[:, -(num_response_tokens + 1) : -1]  # [N, R, V]
    labels = input_ids[:, -num_response_tokens:]  # [N, R]

    step = chunk_size or max(num_rows, 1)
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, num_rows, step):
        chunk = logits[start : start + step]  # [n, R, V]
        logprob_chunks.append(
            logprobs_from_logits(chunk, labels[start : start + step], temperature)
        )
        if with_entropy:
            entropy_chunks.append(entropy_from_logits(chunk, temperature))
    logprobs = torch.cat(logprob_chunks, dim=0)  # [N, R]
    entropy = torch.cat(entropy_chunks, dim=0) if with_entropy else None  # [N, R]
    return logprobs, entropy
