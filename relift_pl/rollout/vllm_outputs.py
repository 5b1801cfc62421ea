"""vLLM requests and their results, without vLLM: one seed per request, and finished
completions as a :class:`RolloutBatch` (used by :class:`relift_pl.rollout.vllm.VLLMRolloutEngine`)."""

from __future__ import annotations

import torch

from relift_pl.rollout.base import RolloutBatch, left_pad, right_pad


def completions_to_batch(
    prompt_ids: list[list[int]],
    tokens: list[list[int]],
    logprobs: list[list[float]],
    finish_reasons: list[str | None],
    n: int,
    pad_id: int,
) -> RolloutBatch:
    """A :class:`RolloutBatch` from vLLM's finished completions, prompt-major.

    Each row's mask covers exactly the tokens vLLM returned for it and its finish reason is vLLM's
    own: the rows end at different lengths (a ``max_model_len`` cut depends on the prompt's
    length), and with pad id == EOS id (Qwen, the toy model) scanning the padded batch for the
    first EOS would read a shorter row's padding as an EOS it never sampled.

    Args:
        prompt_ids: the prompts (token ids, no padding).
        tokens: ``len(prompt_ids) * n`` generated token lists; a stop token, when vLLM stopped on
            one, is the last (the policy learns to emit it).
        logprobs: the engine's log-prob of each of those tokens.
        finish_reasons: vLLM's ``CompletionOutput.finish_reason`` of each.
        n: samples per prompt.
        pad_id: id written after each response.
    """
    reasons = []
    for row, reason in enumerate(finish_reasons):
        if reason not in ("stop", "length"):  # abort / error / repetition: not a sample to train on
            raise RuntimeError(
                f"vLLM finished response {row} with finish_reason={reason!r}; a rollout expects "
                "'stop' (a stop token) or 'length' (max_new_tokens or max_model_len)"
            )
        reasons.append(reason)
    ids, mask = left_pad(prompt_ids, pad_id)
    response, response_mask = right_pad(tokens, pad_id)  # [N, R], each row's own length
    sampled_logprobs = torch.zeros(response.shape, dtype=torch.float32)  # [N, R]
    for row, values in enumerate(logprobs):
        sampled_logprobs[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return RolloutBatch(
        prompt_ids=ids.repeat_interleave(n, dim=0),
        prompt_mask=mask.repeat_interleave(n, dim=0),
        response_ids=response,
        response_mask=response_mask,
        finish_reasons=reasons,
        logprobs=sampled_logprobs,
    )


_SEED_BLOCK = 1 << 20  # prompts one call may hold before its seeds reach those of seed + 1


def request_seeds(
    seed: int | None, num_prompts: int, n: int, engine_index: int = 0, num_engines: int = 1
) -> list[int | None]:
    """One vLLM request seed per prompt, so that no two (prompt, sample) streams coincide.

    vLLM gives sample j of a request seeded ``s`` the seed ``s + j``, so request seeds one apart
    (``seed + i``) share n - 1 streams between neighbouring prompts. Each request gets its own
    block of n seeds instead, blocks of the engines of a data-parallel run interleaved (they see
    different prompts), and a call with seed + 1 starts past every block of a call with seed.

    Args:
        seed: ``SamplingParams.seed``; None leaves every request unseeded.
        num_prompts: requests in this call (the tensor-parallel group's prompts).
        n: samples per request.
        engine_index: this engine among the data-parallel engines; num_engines: how many.
    """
    if seed is None:
        return [None] * num_prompts
    if num_prompts > _SEED_BLOCK:
        raise ValueError(f"at most {_SEED_BLOCK} prompts per seeded call, got {num_prompts}")
    return [
        # Below 2**62, so that a sample's seed (request seed + j) stays an int64, which vLLM
        # uses when it serialises requests.
        n * ((seed * _SEED_BLOCK + i) * num_engines + engine_index) % (1 << 62)
        for i in range(num_prompts)
    ]
