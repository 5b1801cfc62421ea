"""The weight push sends checkpoint-format tensors: what ``save_pretrained`` writes, what vLLM loads.

Transformers 5 loads MoE experts into fused 3-D tensors (``mlp.experts.gate_up_proj``); vLLM's
loaders take only the checkpoint's per-expert names and skip others without a warning, which left
a pushed MoE engine's experts stale. No vLLM needed: the reference is the checkpoint itself.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3MoeConfig

from relift_pl.rollout.vllm_weights import check_streamable_conversion, to_checkpoint_format

pytest.importorskip("transformers.core_model_loading")  # transformers 5


def _tiny_moe_config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip


def _saved_and_loaded(tmp_path, config):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():  # trained weights: every tensor differs from the saved ones
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    return policy


def test_moe_experts_are_pushed_under_checkpoint_names_and_layout(tmp_path):
    policy = _saved_and_loaded(tmp_path, _tiny_moe_config())
    assert "model.layers.0.mlp.experts.gate_up_proj" in policy.state_dict()  # fused in memory
    check_streamable_conversion(policy)  # one fused tensor -> many: streams tensor by tensor
    pushed = dict(to_checkpoint_format(policy, policy.state_dict().items()))

    policy.save_pretrained(tmp_path / "trained")
    checkpoint = load_file(tmp_path / "trained" / "model.safetensors")
    assert sorted(pushed) == sorted(checkpoint)
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in pushed
    for name, tensor in checkpoint.items():
        assert torch.equal(pushed[name], tensor), name


def test_moe_built_from_config_converts_too(tmp_path):
    policy = AutoModelForCausalLM.from_config(_tiny_moe_config())  # no load-time record
    pushed = dict(to_checkpoint_format(policy, policy.state_dict().items()))
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in pushed
    assert not any(name.endswith("experts.gate_up_proj") for name in pushed)


def test_dense_tensors_pass_unchanged(tmp_path):
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    policy = _saved_and_loaded(tmp_path, config)
    state = list(policy.state_dict().items())
    pushed = list(to_checkpoint_format(policy, iter(state)))
    assert [n for n, _ in pushed] == [n for n, _ in state]
    assert all(a is b for (_, a), (_, b) in zip(pushed, state, strict=True))


def test_conversion_that_joins_tensors_is_refused():
    from transformers.core_model_loading import Chunk, WeightConverter

    policy = nn.Linear(2, 2)  # a model whose checkpoint fuses qkv that transformers splits
    policy._weight_conversions = [
        WeightConverter("attn.qkv", ["attn.q", "attn.k", "attn.v"], operations=[Chunk(dim=0)])
    ]
    with pytest.raises(ValueError, match=r"tensor-by-tensor weight push cannot rebuild.*rollout=hf"):
        check_streamable_conversion(policy)
    check_streamable_conversion(nn.Linear(2, 2))  # no conversion: fine
