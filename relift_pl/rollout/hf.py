"""Rollouts with Hugging Face ``generate`` on the policy itself (no weight sync needed)."""

from __future__ import annotations

import torch

from relift_pl.rollout.base import RolloutBatch, RolloutEngine, SamplingParams, cut_at_eos, left_pad


class HFRolloutEngine(RolloutEngine):
    """Samples from the training policy with one batched ``generate`` call per rollout.

    Args:
        synced_gpus: pass ``synced_gpus=True`` to ``generate`` so sharded (FSDP2) ranks that stop
            at different lengths keep taking part in each other's forward passes. ``None`` turns
            it on whenever a process group with more than one rank exists.
    """

    def __init__(self, synced_gpus: bool | None = None) -> None:
        self.synced_gpus = synced_gpus
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
        greedy = sampling.temperature == 0
        was_training = self.policy.training
        self.policy.eval()
        try:
            out = self.policy.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None if greedy or sampling.top_k == 0 else sampling.top_k,
                num_return_sequences=sampling.n,
                max_new_tokens=sampling.max_new_tokens,
                min_new_tokens=sampling.min_new_tokens or None,
                eos_token_id=self._eos_ids(),
                pad_token_id=pad_id,
                synced_gpus=synced,
                use_cache=True,
            )
        finally:
            self.policy.train(was_training)
        response = out[:, ids.shape[1] :].cpu()  # [N, R]
        response, response_mask, reasons = cut_at_eos(response, self._eos_ids(), pad_id)
        return RolloutBatch(
            prompt_ids=ids.repeat_interleave(sampling.n, dim=0),
            prompt_mask=mask.repeat_interleave(sampling.n, dim=0),
            response_ids=response,
            response_mask=response_mask,
            finish_reasons=reasons,
        )
