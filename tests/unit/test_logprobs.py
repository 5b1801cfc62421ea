"""Token log-probs and entropies, against log_softmax references and unpadded model runs."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from relift_pl.algorithms import entropy_from_logits, logprobs_from_logits, policy_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_log_softmax(temperature):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3))
    result = logprobs_from_logits(logits, labels, temperature)
    reference = torch.log_softmax(logits / temperature, dim=-1).gather(-1, labels[..., None])[
        ..., 0
    ]
    torch.testing.assert_close(result, reference)
    (grad,) = torch.autograd.grad(result.sum(), logits)
    (ref_grad,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(grad, ref_grad)


def test_logprobs_upcast_bfloat16():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5).bfloat16()
    labels = torch.randint(0, 5, (2, 3))
    result = logprobs_from_logits(logits, labels)
    assert result.dtype == torch.float32
    reference = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(result, reference)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_matches_reference(temperature):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    reference = -(logp.exp() * logp).sum(dim=-1)
    torch.testing.assert_close(entropy_from_logits(logits, temperature), reference)


def test_uniform_entropy_is_log_vocab():
    torch.testing.assert_close(
        entropy_from_logits(torch.zeros(1, 1, 8)), torch.log(torch.tensor([[8.0]]))
    )


def test_bad_temperature_raises():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), 0.0)


@pytest.fixture(scope="module")
def tiny_models():
    """Tiny random causal LMs. RoPE (Qwen2) is blind to a constant position shift, so wrong position
    ids would go unnoticed there; GPT-2's absolute position embeddings are not."""
    torch.manual_seed(0)
    qwen2 = Qwen2Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    gpt2 = GPT2Config(
        vocab_size=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return {"qwen2": Qwen2ForCausalLM(qwen2).eval(), "gpt2": GPT2LMHeadModel(gpt2).eval()}


class _Recorder(nn.Module):
    """Forwards to the model and records `position_ids` and `logits_to_keep` (taken by name)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.position_ids, self.logits_to_keep = model, None, None

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep=0):
        self.position_ids, self.logits_to_keep = position_ids, logits_to_keep
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, logits_to_keep=logits_to_keep,
        )  # fmt: skip


class _NoLogitsToKeep(nn.Module):
    """A model whose forward does not take `logits_to_keep`: full logits come back."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache,
        )  # fmt: skip


PAD = 0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12]]  # left-padded to P = 5
RESPONSES = [[13, 14, 15, 16], [17, 18]]  # right-padded to R = 4


def _batch():
    p_len, r_len = max(map(len, PROMPTS)), max(map(len, RESPONSES))
    ids, mask = [], []
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        left, right = p_len - len(prompt), r_len - len(response)
        ids.append([PAD] * left + prompt + response + [PAD] * right)
        mask.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
    return torch.tensor(ids), torch.tensor(mask), r_len


def _unpadded_reference(model, temperature):
    """Per-sequence log-probs / entropies of the response tokens, each sequence run alone."""
    logprobs, entropies = [], []
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].float()  # [L, V]
        logits = logits[len(prompt) - 1 : -1] / temperature  # [r, V], predicts the response
        logp = torch.log_softmax(logits, dim=-1)
        logprobs.append(logp.gather(-1, torch.tensor(response)[:, None])[:, 0])
        entropies.append(-(logp.exp() * logp).sum(-1))
    return logprobs, entropies


@pytest.mark.parametrize(
    ("name", "wrapper", "chunk_size"),
    [("qwen2", _Recorder, None), ("qwen2", _NoLogitsToKeep, 1), ("gpt2", _Recorder, None)],
)
def test_policy_logprobs_match_unpadded_runs(tiny_models, name, wrapper, chunk_size):
    # Left padding shifts absolute positions; cumsum position ids must undo it exactly.
    model = wrapper(tiny_models[name])
    input_ids, attention_mask, r_len = _batch()
    with torch.no_grad():
        logprobs, entropy = policy_logprobs(
            model, input_ids, attention_mask, r_len,
            temperature=0.8, with_entropy=True, chunk_size=chunk_size,
        )  # fmt: skip
    assert logprobs.shape == entropy.shape == (2, r_len)
    if wrapper is _Recorder:
        assert model.logits_to_keep == r_len + 1
        # Row 0: 2 pads then 7 real tokens; row 1: 7 real tokens then 2 pads (positions repeat).
        expected = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 6, 6]])
        torch.testing.assert_close(model.position_ids, expected)
    ref_logprobs, ref_entropies = _unpadded_reference(tiny_models[name], temperature=0.8)
    for i, response in enumerate(RESPONSES):
        n = len(response)  # compare real response tokens only; padding is garbage
        torch.testing.assert_close(logprobs[i, :n], ref_logprobs[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy[i, :n], ref_entropies[i], atol=1e-5, rtol=1e-5)


def test_policy_logprobs_is_differentiable(tiny_models):
    tiny_qwen2 = tiny_models["qwen2"]
    input_ids, attention_mask, r_len = _batch()
    logprobs, entropy = policy_logprobs(tiny_qwen2, input_ids, attention_mask, r_len)
    assert entropy is None
    logprobs[:, :2].sum().backward()
    assert tiny_qwen2.lm_head.weight.grad.abs().sum() > 0
    tiny_qwen2.zero_grad(set_to_none=True)


def test_policy_logprobs_rejects_bad_response_width(tiny_models):
    input_ids, attention_mask, _ = _batch()
    with pytest.raises(ValueError, match="num_response_tokens"):
        policy_logprobs(tiny_models["qwen2"], input_ids, attention_mask, input_ids.shape[1])
