"""Rollouts from the policy itself (no weight sync needed): our sampling loop or Hugging Face ``generate``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from relift_pl.rollout.base import RolloutBatch, RolloutEngine, SamplingParams, cut_at_eos, left_pad
from relift_pl.rollout.decode import prefill_prompts, sample_responses, supports

DECODERS = ("loop", "generate")


class HFRolloutEngine(RolloutEngine):
    """Samples from the training policy, all prompts x n samples in one batch.

    Args:
        decode: ``"loop"`` (default): :func:`relift_pl.rollout.decode.sample_responses`, a
            sampling loop over a KV cache written in place, the same samples as ``generate`` for the
            same seed at a lower cost per token (models with non-attention layers fall back to
            ``generate``); ``"generate"``: Hugging Face ``generate``.
        synced_gpus: sharded (FSDP2) ranks that stop at different lengths keep taking part in
            each other's forward passes until all are done (``generate``'s ``synced_gpus``).
            ``None`` turns it on whenever a process group with more than one rank exists.
        share_prompt_prefill: with ``n > 1``, run each prompt (but its last token) once and copy
            its KV cache to its n samples, instead of ``generate`` prefilling every copy: the
            same samples for the same seed (tested), a prefill n times cheaper. Off when
            ``synced_gpus`` is on with ``decode="generate"``.
    """

    def __init__(
        self,
        synced_gpus: bool | None = None,
        share_prompt_prefill: bool = True,
        decode: str = "loop",
    ) -> None:
        if decode not in DECODERS:
            raise ValueError(f"rollout.engine.decode must be one of {DECODERS}, got {decode!r}")
        self.decode = decode
        self.synced_gpus = synced_gpus
        self.share_prompt_prefill = share_prompt_prefill
        self.policy: torch.nn.Module | None = None
        self.tokenizer = None

    def bind(self, policy: torch.nn.Module, tokenizer) -> None:
        self.policy = policy
        self.tokenizer = tokenizer

    def _eos_ids(self) -> list[int]:
        eos = self.policy.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        if self.policy is None:
            raise RuntimeError("HFRolloutEngine.generate called before bind(policy, tokenizer)")
        pad_id = self.tokenizer.pad_token_id
        device = next(self.policy.parameters()).device
        ids, mask = left_pad(prompt_ids, pad_id)
        synced = self.synced_gpus
        if synced is None:
            synced = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        was_training = self.policy.training
        self.policy.eval()
        try:
            ids, mask = ids.to(device), mask.to(device)
            with gathered_for_sampling(self.policy):
                response = self._sample(ids, mask, sampling, synced)
        finally:
            self.policy.train(was_training)
        ids, mask = ids.cpu(), mask.cpu()
        response, response_mask, reasons = cut_at_eos(response.cpu(), self._eos_ids(), pad_id)
        return RolloutBatch(
            prompt_ids=ids.repeat_interleave(sampling.n, dim=0),
            prompt_mask=mask.repeat_interleave(sampling.n, dim=0),
            response_ids=response,
            response_mask=response_mask,
            finish_reasons=reasons,
        )

    def _sample(self, ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingParams, synced: bool):
        """[N, T] raw response ids: our sampling loop, or ``generate``."""
        if self.decode == "loop" and supports(self.policy):
            return sample_responses(
                self.policy, ids, mask, sampling, self._eos_ids(), self.tokenizer.pad_token_id,
                share_prompt_prefill=self.share_prompt_prefill, synced=synced,
            )  # fmt: skip
        return self._generate(ids, mask, sampling, synced)

    def _generate(
        self, ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingParams, synced: bool
    ):
        """[N, T] raw response ids from Hugging Face ``generate``."""
        greedy = sampling.temperature == 0
        cache = None
        if self.share_prompt_prefill and not synced and sampling.n > 1:
            cache = self._shared_prefill(ids, mask, sampling.n)
        extra = {} if cache is None else {"past_key_values": cache}
        repeats = 1 if cache is None else sampling.n  # rows already expanded to the samples
        out = self.policy.generate(
            input_ids=ids.repeat_interleave(repeats, dim=0),
            attention_mask=mask.repeat_interleave(repeats, dim=0),
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy or sampling.top_k == 0 else sampling.top_k,
            num_return_sequences=sampling.n // repeats,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens or None,
            eos_token_id=self._eos_ids(),
            pad_token_id=self.tokenizer.pad_token_id,
            synced_gpus=synced,
            use_cache=True,
            **extra,
        )
        return out[:, ids.shape[1] :]

    def _shared_prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int):
        """The KV cache of every prompt but its last token, computed once and repeated n times;
        None if the model did not fill it. ``generate`` then runs the last prompt token of each
        sample and samples as usual."""
        from transformers import DynamicCache

        if ids.shape[1] < 2:
            return None
        cache = prefill_prompts(self.policy, ids, mask, DynamicCache(), repeats=n)
        return cache if cache.get_seq_length() == ids.shape[1] - 1 else None


@contextmanager
def gathered_for_sampling(policy: torch.nn.Module) -> Iterator[None]:
    """Under FSDP2, keeps every layer's parameters gathered for the whole generation.

    Sampling runs one forward per token; with FSDP2's default each forward all-gathers every
    layer's weights and frees them again, so a 7B model would move its full weights over the
    network once per token. Gathering once per rollout costs the unsharded weights in memory for
    its duration instead. A no-op for an unsharded policy.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(policy, FSDPModule):
        yield
        return
    policy.set_reshard_after_forward(False)
    try:
        yield
    finally:
        policy.set_reshard_after_forward(True)
        policy.set_reshard_after_forward(False, recurse=False)  # the root's own default
        for module in policy.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
