"""The memory plan: each formula against hand-computed numbers, the config mapping, and the
activation and log-prob terms against what autograd really keeps for a tiny Qwen2 on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from transformers import Qwen2Config, Qwen2ForCausalLM

from relift_pl.algorithms import policy_logprobs
from relift_pl.memory_plan import (
    GiB,
    RunShape,
    activation_bytes,
    layer_activation_bytes_per_token,
    logprob_path_bytes,
    model_extra_bytes_per_token,
    plan_memory,
    run_shape_from_config,
)
from relift_pl.model_shape import KNOWN_MODELS, load_model_shape, model_shape_from_config

ROOT = Path(__file__).resolve().parents[2]
QWEN_7B = KNOWN_MODELS["Qwen/Qwen2.5-Math-7B"]
RECIPE = RunShape(  # the paper's setup on 8 x 80 GB (vLLM TP 2 at 0.8, sleep level 1)
    world_size=8, master_bytes=4, compute_bytes=2, rl_tokens=32768, sft_tokens=32768,
    max_sequence=9216, gradient_checkpointing=True, offload_sft_optimizer=True,
    engine="vllm", gpu_memory_utilization=0.8, sleep_level=1, tensor_parallel=2,
    engine_bytes=2, device_bytes=80 * GiB, overhead_bytes=2 * GiB,
)  # fmt: skip


def test_parameter_counts_by_hand():
    # 7B layer: q 3584^2 + 3584, k and v 3584 x 512 + 512 each, o 3584^2, MLP 3 x 3584 x 18944,
    # two norms 2 x 3584 = 233,057,792; root: embedding + untied head 2 x 152064 x 3584 + norm.
    assert QWEN_7B.layer_params == 233_057_792
    assert QWEN_7B.params == 28 * 233_057_792 + 2 * 152064 * 3584 + 3584 == 7_615_616_512
    # 1.5B: layer 46,797,824; tied embedding 151936 x 1536 counted once.
    qwen_1_5b = KNOWN_MODELS["Qwen/Qwen2.5-Math-1.5B"]
    assert qwen_1_5b.params == 28 * 46_797_824 + 151936 * 1536 + 1536 == 1_543_714_304
    # K and V of 28 layers x 4 heads x 128 dims, bf16.
    assert QWEN_7B.kv_cache_bytes_per_token(2) == 2 * 28 * 4 * 128 * 2 == 57_344


def test_local_config_json_is_read(tmp_path):
    config = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100, "tie_word_embeddings": True,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = load_model_shape(str(tmp_path))
    # Llama: no q/k/v bias. 64x64 + 2 x 64x32 + 64x64 + 3 x 64x160 + 2 x 64 = 43,136 per layer.
    assert shape.layer_params == 43_136
    assert shape.params == 3 * 43_136 + 100 * 64 + 64
    with pytest.raises(KeyError, match="known hub id"):
        load_model_shape("someone/unknown-model")


def test_recipe_terms_by_hand():
    c, t = 2, 32768
    # One 7B layer, per token: norms 2 x (4h + 4 + 2 c h) = 57,352; attention q, repeated k and
    # v, out: 4 x c x 3584 + lse 4 x 28 = 28,784; MLP 4 c f = 151,552; additive mask c L = 18,432.
    per_token = layer_activation_bytes_per_token(QWEN_7B, c, repeat_kv=True, sequence=9216)
    assert per_token == 57_352 + 28_784 + 151_552 + 18_432 == 256_120
    kept, rebuilt = activation_bytes(QWEN_7B, RECIPE, t)
    assert kept == 28 * 2 * 3584 * t == 6_576_668_672  # each layer's bf16 input
    assert rebuilt == 256_120 * t
    # Full logits: 5 float32 [T, V] copies; fused: 4 float32 [chunk, V] buffers.
    assert logprob_path_bytes(QWEN_7B, t, None) == 5 * t * 152064 * 4 == 99_656_663_040
    assert logprob_path_bytes(QWEN_7B, t, 2048) == 4 * 2048 * 152064 * 4 == 4_982_833_152
    assert model_extra_bytes_per_token(QWEN_7B, c) == 4 * 3584 + 4 + 2 * 2 * 3584 + 2 * 2 * 128 + 8


def _items(phase):
    return {item.name: item for item in phase.items}


def test_recipe_phases_add_up():
    plan = plan_memory(QWEN_7B, RECIPE)
    rollout, rl, sft = plan.phases
    p = 7_615_616_512
    assert [ph.name for ph in plan.phases] == ["rollout", "RL update", "SFT step"]
    items = _items(rl)
    assert items["master weights (shard)"].bytes == p * 4 // 8
    assert items["RL AdamW moments (shard)"].bytes == 2 * p * 4 // 8
    assert items["SFT AdamW moments (shard)"].bytes == 0  # offloaded between SFT steps ...
    at_step = _items(sft)["SFT AdamW moments, at its step"]  # ... back for the step only, after
    assert at_step.bytes == 2 * p * 4 // 8 and not at_step.counted  # the backward's peak
    # Full logits dwarf the rebuilt layer: the phase counts the log-prob path, not both.
    assert (
        items["log-prob/entropy path"].counted
        and not items["one layer rebuilt in backward"].counted
    )
    assert rl.total == sum(i.bytes for i in rl.items if i.counted)
    assert plan.margin(rl) == 80 * GiB - rl.total < 0  # the recipe does not fit without the head
    # vLLM at 0.8 of 80 GiB, TP 2: bf16 weights P x 2 / 2, the rest of its share is KV cache.
    engine = _items(rollout)
    assert engine["vLLM weights"].bytes == p
    assert engine["vLLM KV cache + activations"].bytes == int(0.8 * 80 * GiB) - p
    fused = plan_memory(QWEN_7B, RunShape(**{**RECIPE.__dict__, "token_chunk": 2048}))
    items = _items(fused.phases[1])
    assert (
        not items["log-prob/entropy path"].counted
        and items["one layer rebuilt in backward"].counted
    )
    assert fused.margin(fused.phases[1]) > 0 and fused.margin(fused.phases[2]) > 0


def test_deferred_gradient_sync_and_no_sleep():
    run = RunShape(**{**RECIPE.__dict__, "defer_grad_sync": True, "sleep_level": None})
    rl = _items(plan_memory(QWEN_7B, run).phases[1])
    assert rl["unsharded accumulated gradients"].bytes == 7_615_616_512 * 4
    assert not rl["gradients (shard)"].counted
    # Without sleep mode the engine's whole share stays through training.
    assert rl["vLLM engine (awake: no sleep mode)"].bytes == int(0.8 * 80 * GiB)


def test_run_shape_from_the_composed_recipe(make_cfg):
    cfg = make_cfg("experiment=relift_qwen_math_7b", "trainer=fsdp_8gpu", "rollout=vllm",
                   "rollout.engine.tensor_parallel_size=2", "rollout.engine.sleep_level=1",
                   "algorithm.logprob_token_chunk=1024")  # fmt: skip
    run = run_shape_from_config(cfg, device_gb=40)
    assert (run.world_size, run.sharded, run.compute_bytes) == (8, True, 2)
    assert run.master_bytes == {"float32": 4, "bfloat16": 2}[cfg.model.dtype]
    assert run.rl_tokens == run.sft_tokens == 32768
    # The longest row: a prompt with a full response, or with the longest demonstration.
    assert run.max_sequence == cfg.data.max_prompt_length + max(8192, cfg.data.max_demo_length)
    assert run.gradient_checkpointing and run.offload_sft_optimizer
    assert (run.engine, run.tensor_parallel, run.sleep_level) == ("vllm", 2, 1)
    assert run.rollout_sequences == 128 * 8 // 8
    assert run.token_chunk == 1024 and run.device_bytes == 40 * GiB


def test_script_prints_the_table():
    proc = subprocess.run(
        [sys.executable, "scripts/plan_memory.py", "experiment=relift_qwen_math_7b",
         "trainer=fsdp_8gpu", "--token-chunk", "2048", "--device-gb", "80"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "token_chunk=2048" in proc.stdout and "margin" in proc.stdout
    assert "log-prob/entropy path" in proc.stdout


def test_the_plan_shards_over_every_node(make_cfg):
    """trainer.num_nodes counts (scripts/plan_memory.py ... trainer=multinode trainer.num_nodes=4):
    FSDP2 shards the persistent state over nodes x GPUs, each rank's engine samples its share."""
    runs = {
        nodes: run_shape_from_config(make_cfg(
            "experiment=relift_qwen_math_7b", "trainer=multinode", f"trainer.num_nodes={nodes}"
        ))
        for nodes in (1, 4)
    }  # fmt: skip
    assert (runs[1].world_size, runs[4].world_size) == (8, 32)
    assert runs[4].sharded and runs[4].rollout_sequences == 128 * 8 // 32
    masters = {
        nodes: next(i for i in plan_memory(QWEN_7B, run).phases[0].items if i.name == "master weights (shard)")
        for nodes, run in runs.items()
    }  # fmt: skip
    assert masters[4].formula == "P x 4 B / 32"
    assert masters[4].bytes == pytest.approx(masters[1].bytes / 4, abs=1)


# -- the activation and log-prob formulas against measurement ------------------------------------

TINY = {
    "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}  # fmt: skip


def _tiny_model(vocab=512):
    torch.manual_seed(0)
    config = Qwen2Config(
        **{k: v for k, v in {**TINY, "vocab_size": vocab}.items() if k != "model_type"}
    )
    # bf16 weights and compute, as FSDP2's all-gathered parameters; the real attention classes.
    return Qwen2ForCausalLM(config).to(torch.bfloat16).train()


def _batch(vocab, rows=2, length=64, response=32):
    input_ids = torch.randint(1, vocab, (rows, length))
    mask = torch.ones_like(input_ids)
    mask[0, :5] = 0  # padding: transformers builds the [rows, 1, L, L] mask, as in training
    return input_ids, mask, response


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_what_autograd_keeps(checkpointing):
    """Bytes alive after the forward (activations kept for backward) vs the plan's formula."""
    model = _tiny_model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids, mask, response = _batch(512)
    tracker = MemTracker()
    tracker.track_external(model)  # parameters are parameters, even the head the fused path swaps
    with tracker:
        # The fused head, so no [T, V] term: this checks the layers and the rest.
        logprobs, entropy = policy_logprobs(
            model, input_ids, mask, response, with_entropy=True, token_chunk=8
        )
        # Activations only (the tracker also counts the parameters once modules run).
        kept = tracker.get_tracker_snapshot("current")[torch.device("cpu")][_MemRefType.ACT]
    shape = model_shape_from_config("tiny", TINY)
    rows, length = input_ids.shape
    tokens, predicted = rows * length, int(mask[:, -response:].sum())
    run = RunShape(compute_bytes=2, gradient_checkpointing=checkpointing, max_sequence=length)
    layers, _ = activation_bytes(shape, run, tokens)
    # The plan counts the head's input for every token; the fused head keeps predicted ones.
    extra = model_extra_bytes_per_token(shape, 2) * tokens - 2 * shape.hidden * (tokens - predicted)
    formula = layers + extra + (rows * length * length if checkpointing else 0)  # + bool mask
    # Too small for the plan (< 0.1% at 7B), visible at h = 64: the outputs (two [N, R] and one
    # [N, R, 2] float32: 16 B a position), the fused head's saved labels, logsumexp, entropy and
    # mask (17 B a predicted token), the position ids a checkpoint keeps (8 B a token).
    small = 16 * rows * response + 17 * predicted + (8 * tokens if checkpointing else 0)
    # Measured: 829,504 vs 828,992 bytes without checkpointing, 111,680 vs 111,168 with.
    assert abs(kept - (formula + small)) <= 0.01 * formula, (kept, formula + small)


def test_logprob_path_formula_matches_measured_peak():
    """Peak memory of a forward + backward, full logits minus fused head, vs the plan."""
    vocab = 8192  # large enough that the [T, V] terms dominate
    model = _tiny_model(vocab)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids, mask, response = _batch(vocab, rows=4, response=48)
    peaks = {}
    for chunk in (None, 16):
        tracker = MemTracker()
        with tracker:
            logprobs, entropy = policy_logprobs(
                model, input_ids, mask, response, temperature=0.7, with_entropy=True,
                token_chunk=chunk,
            )  # fmt: skip
            real = mask[:, -response:]
            ((logprobs * real).sum() + 1e-4 * (entropy * real).sum()).backward()
        peaks[chunk] = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
        model.zero_grad(set_to_none=True)
    shape = model_shape_from_config("tiny", {**TINY, "vocab_size": vocab})
    predicted = input_ids.shape[0] * response  # the full path scores padding positions too
    formula = logprob_path_bytes(shape, predicted, None) - logprob_path_bytes(shape, predicted, 16)
    measured = peaks[None] - peaks[16]
    assert abs(measured - formula) <= 0.05 * formula, (measured, formula)  # measured: 0.97


def test_sft_then_rl_counts_its_sft_optimizer(make_cfg):
    # Its warm-up steps are SFT steps with the SFT AdamW, although sft_enabled is false.
    cfg = make_cfg("experiment=relift_qwen_math_7b", "trainer=fsdp_8gpu", "algorithm=sft_then_rl",
                   "algorithm.offload_sft_optimizer=false")
    plan = plan_memory(QWEN_7B, run_shape_from_config(cfg))
    assert [phase.name for phase in plan.phases] == ["rollout", "RL update", "SFT step"]
    assert _items(plan.phases[0])["SFT AdamW moments (shard)"].bytes == 2 * 7_615_616_512 * 4 // 8
