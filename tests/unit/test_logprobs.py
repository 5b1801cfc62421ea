"""Token log-probs and entropies, against log_softmax references and unpadded model runs."""

import warnings

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


# -- token_chunk: the fused head inside the model's forward --------------------------------------


def _weighted_loss(logprobs, entropy, attention_mask, r_len):
    """A loss touching every real response token with its own weight (log-probs and entropies)."""
    mask = attention_mask[:, -r_len:].float()  # [N, R]
    weights = torch.arange(1.0, 1.0 + mask.numel()).reshape(mask.shape) / mask.numel()
    loss = (logprobs * weights * mask).sum()
    if entropy is not None and entropy.requires_grad:
        loss = loss - 0.5 * (entropy * weights.flip(-1) * mask).sum()
    return loss


def _values_and_grads(model, input_ids, attention_mask, r_len, *, fallback=False, **kwargs):
    """(log-probs, entropies) at real response tokens, and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logprobs, entropy = policy_logprobs(model, input_ids, attention_mask, r_len, **kwargs)
    fell_back = any("not applied" in str(w.message) for w in caught)
    assert fell_back == fallback, [str(w.message) for w in caught]
    _weighted_loss(logprobs, entropy, attention_mask, r_len).backward()
    mask = attention_mask[:, -r_len:].bool()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logprobs.detach()[mask], None if entropy is None else entropy.detach()[mask], grads


def _assert_same(fused, full, atol=1e-6):
    torch.testing.assert_close(fused[0], full[0], atol=atol, rtol=0)
    if full[1] is None:
        assert fused[1] is None
    else:
        torch.testing.assert_close(fused[1], full[1], atol=atol, rtol=0)
    assert fused[2].keys() == full[2].keys() and full[2]  # the same parameters got gradients
    for name, grad in full[2].items():
        torch.testing.assert_close(fused[2][name], grad, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])  # gpt2: tied embeddings, absolute positions
@pytest.mark.parametrize(
    ("with_entropy", "entropy_grad", "token_chunk"),
    [(True, True, 3), (True, True, 1000), (True, False, 2), (False, True, 3)],
)
def test_token_chunk_matches_full_logits(
    tiny_models, name, with_entropy, entropy_grad, token_chunk
):
    model = tiny_models[name]
    input_ids, attention_mask, r_len = _batch()
    kwargs = {"temperature": 0.7, "with_entropy": with_entropy, "entropy_grad": entropy_grad}
    full = _values_and_grads(model, input_ids, attention_mask, r_len, **kwargs)
    fused = _values_and_grads(
        model, input_ids, attention_mask, r_len, token_chunk=token_chunk, **kwargs
    )
    _assert_same(fused, full)
    if name == "gpt2":  # one tensor serves as embedding and head: both uses reach its gradient
        assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.lm_head, nn.Linear)  # the original head is back


def test_token_chunk_under_gradient_checkpointing():
    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).train()  # no dropout in Qwen2: train mode is deterministic
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids, attention_mask, r_len = _batch()
    kwargs = {"temperature": 0.7, "with_entropy": True}
    full = _values_and_grads(model, input_ids, attention_mask, r_len, **kwargs)
    fused = _values_and_grads(model, input_ids, attention_mask, r_len, token_chunk=2, **kwargs)
    _assert_same(fused, full)


def _shared_batch():
    """Two prompts with two responses each (GRPO groups): rows 0-1 and 2-3 share a prompt."""
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9, 10, 11], [8, 9, 10, 11]]
    responses = [[13, 14, 15], [16, 17], [18, 19, 20], [21]]
    ids, mask = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        left, right = 4 - len(prompt), 3 - len(response)
        ids.append([PAD] * left + prompt + response + [PAD] * right)
        mask.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
    return torch.tensor(ids), torch.tensor(mask), 3


class _CallCounter(nn.Module):
    """Counts forward calls (and takes every keyword the shared-prompt passes use)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        use_cache,
        past_key_values=None,
        logits_to_keep=0,
    ):
        self.calls += 1
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, past_key_values=past_key_values, logits_to_keep=logits_to_keep,
        )  # fmt: skip


def test_token_chunk_with_shared_prompts(tiny_models):
    counter = _CallCounter(tiny_models["qwen2"])
    input_ids, attention_mask, r_len = _shared_batch()
    kwargs = {"temperature": 0.7, "with_entropy": True}
    shared_full = _values_and_grads(
        counter, input_ids, attention_mask, r_len, share_prompts=True, **kwargs
    )
    counter.calls = 0
    shared_fused = _values_and_grads(
        counter, input_ids, attention_mask, r_len, share_prompts=True, token_chunk=2, **kwargs
    )
    assert counter.calls == 2  # the prompts ran once (pass 1), then the responses (pass 2)
    _assert_same(shared_fused, shared_full)
    plain = _values_and_grads(counter, input_ids, attention_mask, r_len, **kwargs)
    _assert_same(shared_fused, plain, atol=1e-5)  # sharing itself: same function, other rounding


def test_token_chunk_falls_back_for_soft_capped_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    assert config.final_logit_softcapping  # tanh soft-cap after the head: the fused head is wrong
    model = Gemma2ForCausalLM(config).eval()
    input_ids, attention_mask, r_len = _batch()
    full = _values_and_grads(model, input_ids, attention_mask, r_len, with_entropy=True)
    fallback = _values_and_grads(
        model, input_ids, attention_mask, r_len, with_entropy=True, token_chunk=2, fallback=True
    )  # warned: "not applied"
    _assert_same(fallback, full, atol=0)


class _ScaledQwen2(Qwen2ForCausalLM):
    """Claims to be a Qwen2 but rescales its logits after the head."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_token_chunk_refuses_a_model_that_changes_its_logits(tiny_models):
    torch.manual_seed(0)
    model = _ScaledQwen2(tiny_models["qwen2"].config).eval()
    head = model.lm_head
    input_ids, attention_mask, r_len = _batch()
    with pytest.raises(RuntimeError, match="unchanged"):
        policy_logprobs(model, input_ids, attention_mask, r_len, token_chunk=2)
    assert model.lm_head is head  # restored on the error path too


def test_token_chunk_saves_no_vocabulary_sized_tensor():
    """What autograd keeps for backward: [tokens, vocab] float32 tensors on the full path, none
    with the fused head (its chunks' logits are recomputed in backward)."""
    torch.manual_seed(0)
    vocab = 1000  # larger than every other dimension, so its tensors are recognisable
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    params = {p.data_ptr() for p in model.parameters()}
    input_ids, attention_mask, r_len = _batch()
    num_rows = input_ids.shape[0]

    def saved_vocab_bytes(**kwargs) -> int:
        saved = []

        def pack(tensor):
            if tensor.data_ptr() not in params and tensor.shape[-1] == vocab:
                saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logprobs, entropy = policy_logprobs(
                model,
                input_ids,
                attention_mask,
                r_len,
                temperature=0.7,
                with_entropy=True,
                **kwargs,
            )
        # Each distinct storage once (views of one tensor are saved several times).
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        return sum(storages.values())

    one_copy = num_rows * r_len * vocab * 4  # [N, R, V] float32
    # Full logits: the scaled logits (kept by logsumexp and the entropy's product) and the softmax.
    assert saved_vocab_bytes() >= 2 * one_copy
    assert saved_vocab_bytes(token_chunk=2) == 0
