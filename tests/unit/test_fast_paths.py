"""The performance paths give the results of the plain ones (docs/performance.md lists them).

- `logprobs_and_entropy`: one logsumexp, one softmax == `logprobs_from_logits` + `entropy_from_logits`.
- entropy without autograd (metrics only): same values, nothing kept for backward.
- `policy_logprobs(share_prompts=True)`: each prompt once, responses against its KV cache ==
  the one-pass forward, values and gradients.
- `HFRolloutEngine(share_prompt_prefill=True, decode="generate")`: the same samples for the same
  seed (the sampling loop's own tests: test_decode_loop.py).
- `ReLIFTModule.decode_responses` (batched decode) == the per-token filter it replaced.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from relift_pl.algorithms import (
    entropy_from_logits,
    logprobs_and_entropy,
    logprobs_from_logits,
    policy_logprobs,
)
from relift_pl.rollout.base import RolloutBatch, SamplingParams
from relift_pl.rollout.hf import HFRolloutEngine

PAD = 0
VOCAB = 40


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_logprobs_and_entropy_match_separate_ones(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 4))
    lp, ent = logprobs_and_entropy(logits, labels, temperature, entropy="grad")
    ref_lp = logprobs_from_logits(logits, labels, temperature)
    ref_ent = entropy_from_logits(logits, temperature)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    weights = torch.randn(3, 4)
    grad = torch.autograd.grad((lp * weights).sum() + (ent * weights).sum(), logits)[0]
    ref = torch.autograd.grad((ref_lp * weights).sum() + (ref_ent * weights).sum(), logits)[0]
    torch.testing.assert_close(grad, ref)


def test_fused_entropy_without_grad_and_bfloat16():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7).bfloat16().requires_grad_()
    labels = torch.randint(0, 7, (2, 3))
    lp, ent = logprobs_and_entropy(logits, labels, entropy="no_grad")
    assert lp.dtype == ent.dtype == torch.float32
    assert lp.requires_grad and not ent.requires_grad  # metrics only: no graph kept
    torch.testing.assert_close(ent, entropy_from_logits(logits.detach()))
    assert logprobs_and_entropy(logits, labels, entropy=None)[1] is None
    with pytest.raises(ValueError, match="entropy"):
        logprobs_and_entropy(logits, labels, entropy="yes")


@pytest.fixture(scope="module")
def tiny_qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=PAD, pad_token_id=PAD)
    return model.train()


def _grouped_batch(group: int = 3):
    """Three prompts of different lengths (left-padded) x `group` responses (right-padded)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 3, 6)]
    p_len, r_len = 6, 7
    ids, mask = [], []
    for p_idx, prompt in enumerate(prompts):
        for g in range(group):
            length = r_len - (p_idx + g) % 4  # ragged responses
            response = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
            left, right = p_len - len(prompt), r_len - length
            ids.append([PAD] * left + prompt + response + [PAD] * right)
            mask.append([0] * left + [1] * (len(prompt) + length) + [0] * right)
    return torch.tensor(ids), torch.tensor(mask), r_len


def _run(model, ids, mask, r_len, **kwargs):
    model.zero_grad(set_to_none=True)
    lp, ent = policy_logprobs(model, ids, mask, r_len, temperature=0.9, with_entropy=True, **kwargs)
    response_mask = mask[:, -r_len:].float()
    weights = torch.linspace(-1, 1, ids.shape[0])[:, None]
    ((lp * weights * response_mask).sum() + (ent * response_mask).sum() * 0.1).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return lp.detach(), ent.detach(), grads, response_mask.bool()


def test_shared_prompt_pass_matches_one_pass(tiny_qwen2):
    ids, mask, r_len = _grouped_batch()
    lp, ent, grads, real = _run(tiny_qwen2, ids, mask, r_len)
    s_lp, s_ent, s_grads, _ = _run(tiny_qwen2, ids, mask, r_len, share_prompts=True)
    torch.testing.assert_close(s_lp[real], lp[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_ent[real], ent[real], atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(s_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prompt_pass_with_shuffled_rows_and_one_token(tiny_qwen2):
    # Token-budget micro-batches reorder rows: groups need not be adjacent. R = 1: no 2nd pass.
    ids, mask, r_len = _grouped_batch()
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(0))
    ids, mask = ids[order], mask[order]
    for cut in (r_len, 1):
        sub_ids, sub_mask = ids[:, : ids.shape[1] - r_len + cut], mask[:, : ids.shape[1] - r_len + cut]
        lp, _, grads, real = _run(tiny_qwen2, sub_ids, sub_mask, cut)
        s_lp, _, s_grads, _ = _run(tiny_qwen2, sub_ids, sub_mask, cut, share_prompts=True)
        torch.testing.assert_close(s_lp[real], lp[real], atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(s_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


class _CountingModel(torch.nn.Module):
    """Records the batch sizes the model is called with (and forwards every keyword)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep=0,
                past_key_values=None):
        self.calls.append(tuple(input_ids.shape))
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, logits_to_keep=logits_to_keep, past_key_values=past_key_values,
        )  # fmt: skip


def test_shared_prompt_pass_runs_each_prompt_once_and_falls_back(tiny_qwen2):
    ids, mask, r_len = _grouped_batch(group=4)
    counting = _CountingModel(tiny_qwen2)
    with torch.no_grad():
        policy_logprobs(counting, ids, mask, r_len, share_prompts=True)
    p_len = ids.shape[1] - r_len
    assert counting.calls == [(3, p_len), (12, r_len - 1)]  # 3 distinct prompts, then responses
    # No repeated prompt: one ordinary pass.
    counting.calls.clear()
    with torch.no_grad():
        policy_logprobs(counting, ids[::4], mask[::4], r_len, share_prompts=True)
    assert counting.calls == [(3, ids.shape[1])]


def test_shared_prompt_pass_off_under_gradient_checkpointing(tiny_qwen2):
    ids, mask, r_len = _grouped_batch()
    lp, *_ = _run(tiny_qwen2, ids, mask, r_len)
    tiny_qwen2.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:  # HF drops the KV cache under checkpointing: sharing must not silently lose the prompt
        s_lp, _, _, real = _run(tiny_qwen2, ids, mask, r_len, share_prompts=True)
    finally:
        tiny_qwen2.gradient_checkpointing_disable()
    torch.testing.assert_close(s_lp[real], lp[real], atol=1e-5, rtol=1e-5)


def test_entropy_without_grad_keeps_logprob_gradients(tiny_qwen2):
    ids, mask, r_len = _grouped_batch()
    grads = []
    for entropy_grad in (True, False):
        tiny_qwen2.zero_grad(set_to_none=True)
        lp, ent = policy_logprobs(tiny_qwen2, ids, mask, r_len, with_entropy=True,
                                  entropy_grad=entropy_grad)
        assert ent.requires_grad == entropy_grad
        (lp * mask[:, -r_len:]).sum().backward()
        grads.append([p.grad.clone() for p in tiny_qwen2.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("min_new_tokens", [0, 6])
def test_shared_prefill_gives_the_same_samples(tiny_qwen2, min_new_tokens):
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=PAD)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=6, min_new_tokens=min_new_tokens)
    batches = []
    for share in (False, True):
        engine = HFRolloutEngine(share_prompt_prefill=share, decode="generate")
        engine.bind(tiny_qwen2, tokenizer)
        caches: list = []

        def spy(*a, _prefill=engine._shared_prefill, _caches=caches):
            _caches.append(_prefill(*a))
            return _caches[-1]

        engine._shared_prefill = spy
        torch.manual_seed(3)
        batches.append(engine.generate(prompts, sampling))
        assert [c is not None for c in caches] == ([True] if share else [])  # the path ran
    plain, shared = batches
    assert tiny_qwen2.training  # generate restores train mode
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
        assert torch.equal(getattr(plain, field), getattr(shared, field)), field
    assert plain.finish_reasons == shared.finish_reasons


def test_batched_decode_matches_per_token_filter():
    from relift_pl.module import ReLIFTModule

    class Tok:
        eos_token_id = 0

        def decode(self, ids, skip_special_tokens=False):
            return ",".join(map(str, ids))

        def batch_decode(self, rows, skip_special_tokens=False):
            return [self.decode(r) for r in rows]

    response_ids = torch.tensor([[4, 5, 0, 0], [6, 7, 8, 9], [0, 0, 0, 0], [3, 0, 2, 2]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    batch = RolloutBatch(
        prompt_ids=torch.ones(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.long),
        response_ids=response_ids, response_mask=response_mask, finish_reasons=["stop"] * 4,
    )
    module = SimpleNamespace(
        tokenizer=Tok(), policy=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    )
    texts = ReLIFTModule.decode_responses(module, batch)
    reference = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        reference.append(Tok().decode([t for t, m in zip(ids, mask) if m and t != 0]))
    assert texts == reference == ["4,5", "6,7,8,9", "", "3,2"]


def test_sdpa_gqa_matches_sdpa_values_gradients_and_samples(tiny_qwen2):
    """Grouped KV heads go to torch's SDPA as they are (no repeat_kv copies) on CPU."""
    import copy

    from relift_pl.attention import NAME, prefer_sdpa_gqa

    plain = copy.deepcopy(tiny_qwen2)
    plain.set_attn_implementation("sdpa")
    fast = copy.deepcopy(plain)
    assert prefer_sdpa_gqa(fast) and fast.config._attn_implementation == NAME
    assert plain.config._attn_implementation == "sdpa"
    ids, mask, r_len = _grouped_batch()
    runs = [_run(model, ids, mask, r_len, share_prompts=share)
            for model in (plain, fast) for share in (False, True)]
    ref_lp, ref_ent, ref_grads, real = runs[0]
    for lp, ent, grads, _ in runs[1:]:
        torch.testing.assert_close(lp[real], ref_lp[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent[real], ref_ent[real], atol=1e-5, rtol=1e-5)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=PAD)
    sampling = SamplingParams(n=3, temperature=1.0, max_new_tokens=5)
    samples = []
    for model in (plain, fast):
        engine = HFRolloutEngine()
        engine.bind(model, tokenizer)
        torch.manual_seed(5)
        samples.append(engine.generate([[5, 6, 7], [8, 9]], sampling).response_ids)
    assert torch.equal(*samples)


def test_load_policy_prefers_sdpa_gqa_unless_told(tmp_path, tiny_qwen2):
    from relift_pl.attention import NAME
    from relift_pl.models import load_policy

    tiny_qwen2.save_pretrained(tmp_path)
    assert load_policy(str(tmp_path)).config._attn_implementation == NAME
    assert load_policy(str(tmp_path), attn_implementation="eager").config._attn_implementation == "eager"
    assert load_policy(str(tmp_path), attn_implementation=NAME).config._attn_implementation == NAME
