"""Sampling from a Hugging Face causal LM with a loop over a KV cache written in place.

What ``generate`` does for plain sampling (temperature, top-k, top-p, a minimum length), written
out because ``generate`` costs more per token than the model does on small models (measured on
the benchmark workload, docs/performance.md):

- its ``DynamicCache`` grows by ``torch.cat``, copying every layer's whole cache at every token;
  ``StaticCache`` avoids the copy but attends over all its slots, written or not, and holds
  memory for ``max_new_tokens`` from the start. :class:`InPlaceLayer` writes into a buffer that
  doubles when full and hands attention a view of the written part: no per-token copy, the
  same attention inputs.
- its per-token machinery (input preparation, kwargs updates, processor and stopping-criteria
  lists) is generic.

It also samples exactly softmax(logits / T) restricted by top-k / top-p, the distribution the
trainer's log-probs assume, whereas ``generate`` would also apply any extra processors a model's
``generation_config`` asks for (a repetition penalty, say). The warpers are transformers' own
classes in ``generate``'s order, and tokens are drawn with the same ``softmax`` +
``torch.multinomial``, so for the same seed the samples equal ``generate``'s (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from relift_pl.algorithms.logprobs import position_ids_from_mask
from relift_pl.rollout.base import SamplingParams


class InPlaceLayer(DynamicLayer):
    """A cache layer that writes keys and values in place into buffers, handing attention views
    of the filled part (a ``DynamicLayer`` to every reader: the same shapes and values).

    A full buffer doubles (up to ``max_length`` positions), so each position is copied O(1)
    times on average, where ``DynamicLayer``'s ``torch.cat`` copies the whole cache at every
    token; memory follows the longest response so far, not ``max_new_tokens``.
    """

    def __init__(self, max_length: int, initial_capacity: int = 512) -> None:
        super().__init__()
        self.max_length = max_length
        self.initial_capacity = initial_capacity
        self.length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._key_buffer = self._value_buffer = None
        self.length = 0
        self.is_initialized = True

    def _reserve(self, needed: int, key_states: Tensor, value_states: Tensor) -> None:
        capacity = 0 if self._key_buffer is None else self._key_buffer.shape[2]
        if needed <= capacity:
            return
        if needed > self.max_length:
            raise RuntimeError(f"KV cache overflow: {needed} positions > max_length {self.max_length}")
        capacity = min(self.max_length, max(needed, self.initial_capacity, 2 * capacity))
        batch, heads = key_states.shape[:2]
        keys = key_states.new_empty(batch, heads, capacity, key_states.shape[-1])
        values = value_states.new_empty(batch, heads, capacity, value_states.shape[-1])
        if self.length:
            keys[:, :, : self.length] = self.keys
            values[:, :, : self.length] = self.values
        self._key_buffer, self._value_buffer = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(end, key_states, value_states)
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Copies each row to ``repeats`` adjacent rows (a prompt's cache to its samples)."""
        if self.get_seq_length() > 0:
            keys, values = (
                self.keys.repeat_interleave(repeats, 0),
                self.values.repeat_interleave(repeats, 0),
            )
            self.is_initialized = False
            self.update(keys, values)


def in_place_cache(num_layers: int, max_length: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [InPlaceLayer(max_length) for _ in range(num_layers)]
    return cache


def logits_warpers(sampling: SamplingParams) -> LogitsProcessorList:
    """``generate``'s warpers for these settings, in its order (temperature, top-k, top-p)."""
    warpers = LogitsProcessorList()
    if sampling.temperature not in (0.0, 1.0):
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.temperature > 0 and sampling.top_k:
        warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.temperature > 0 and sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
    return warpers


ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


def supports(model: torch.nn.Module) -> bool:
    """True for decoder-only attention models (every layer keeps keys and values); models with
    other layer kinds (linear attention, state-space layers) need ``generate``'s own caches."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    text = config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None) or ["full_attention"]
    return hasattr(text, "num_hidden_layers") and set(layer_types) <= ATTENTION_LAYER_TYPES


def _num_layers(model: torch.nn.Module) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


def prefill_prompts(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, cache, repeats: int = 1):
    """Runs every left-padded prompt but its last token into ``cache`` once, then repeats each
    row of the cache ``repeats`` times (prompt-major: a prompt's samples are adjacent); the last
    prompt token is the first decode step's input. Returns the cache the model filled."""
    if prompt_ids.shape[1] > 1:
        positions = position_ids_from_mask(prompt_mask)
        out = model(
            input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],
            position_ids=positions[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        cache = out.past_key_values if out.past_key_values is not None else cache
    if repeats > 1:
        for layer in cache.layers:
            layer.batch_repeat_interleave(repeats)
    return cache


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    sampling: SamplingParams,
    eos_ids: list[int],
    pad_id: int,
    *,
    share_prompt_prefill: bool = True,
    synced: bool = False,
    stop_check_every: int | None = None,
) -> Tensor:
    """``sampling.n`` responses per prompt, prompt-major.

    Args:
        model: a Hugging Face causal LM (in eval mode; the caller switches it).
        prompt_ids: [B, P] left-padded prompts (P >= 1), on the model's device.
        prompt_mask: [B, P] 1 on real prompt tokens.
        sampling: how to sample (temperature 0: greedy).
        eos_ids: tokens that end a response; masked until ``sampling.min_new_tokens``.
        pad_id: written after a response's EOS.
        share_prompt_prefill: run each prompt (but its last token) once and copy its cache to its
            n samples, instead of prefilling every copy.
        synced: keep stepping until every rank's responses are done (ranks of a sharded model
            must run the same number of forward passes); needs an initialised process group.
        stop_check_every: look whether every response has ended every this many tokens. The
            check reads a device value on the host, which on a GPU stalls the queue of kernels
            once per check; the tokens sampled past the end are dropped, so the result is the
            same. None: 1 on CPU (nothing to stall), 8 elsewhere.

    Returns:
        [B * n, T] raw token ids, T <= max_new_tokens, ``pad_id`` after each row's first EOS.
    """
    n, max_new = sampling.n, sampling.max_new_tokens
    if not share_prompt_prefill:
        prompt_ids, prompt_mask = (
            prompt_ids.repeat_interleave(n, 0),
            prompt_mask.repeat_interleave(n, 0),
        )
    rows, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    positions = position_ids_from_mask(prompt_mask)
    cache = in_place_cache(_num_layers(model), prompt_len + max_new)
    # One mask buffer for the whole response, sliced per step (generate concatenates a column).
    mask = torch.ones(rows, prompt_len + max_new, dtype=prompt_mask.dtype, device=device)
    mask[:, :prompt_len] = prompt_mask
    repeats = n if share_prompt_prefill else 1  # rows are prompts until the prefill is shared
    cache = prefill_prompts(model, prompt_ids, prompt_mask, cache, repeats=repeats)
    mask = mask.repeat_interleave(repeats, 0)
    tokens = prompt_ids[:, -1:].repeat_interleave(repeats, 0)  # the first decode step's input
    position = positions[:, -1:].repeat_interleave(repeats, 0)
    warpers = logits_warpers(sampling)
    eos = torch.tensor(eos_ids, device=device)
    unfinished = torch.ones(tokens.shape[0], dtype=torch.bool, device=device)
    if stop_check_every is None:
        stop_check_every = 1 if device.type == "cpu" else 8
    out = []
    for step in range(max_new):
        logits = model(
            input_ids=tokens, attention_mask=mask[:, : prompt_len + step], position_ids=position,
            past_key_values=cache, use_cache=True,
        ).logits[:, -1].float()  # fmt: skip
        if step < sampling.min_new_tokens:
            logits[:, eos] = float("-inf")
        if sampling.temperature == 0:
            next_tokens = logits.argmax(-1)
        else:
            scores = warpers(None, logits)
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_id))
        out.append(next_tokens)
        unfinished &= ~torch.isin(next_tokens, eos)
        if (step + 1) % stop_check_every == 0 and not _any_unfinished(unfinished, synced):
            break
        tokens, position = next_tokens[:, None], position + 1
    responses = torch.stack(out, dim=1)
    if stop_check_every > 1:  # drop the columns sampled after every response had ended
        responses = responses[:, : _used_width(responses, eos)]
    return responses


def _used_width(responses: Tensor, eos: Tensor) -> int:
    """Columns up to the last first-EOS of any row (all of them if a row has no EOS)."""
    ended = torch.isin(responses, eos)
    if not ended.any(dim=1).all():
        return responses.shape[1]
    return int(ended.int().argmax(dim=1).max()) + 1


def _any_unfinished(unfinished: Tensor, synced: bool) -> bool:
    if not synced:
        return bool(unfinished.any())
    flag = unfinished.any().to(torch.int32)  # 1 while this rank still samples
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)
