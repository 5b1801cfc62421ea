"""Greedy evaluation (temperature 0) with k > 1 on the toy model and the real HF engine.

Engines refuse n > 1 at temperature 0 (``generate`` with ``num_return_sequences``, vLLM), so the
evaluation samples once and counts the response k times; these tests check that this is what
k greedy samples would give, where an engine can draw them.
"""

from __future__ import annotations

import pytest
import torch
from test_evaluate import EVAL_OVERRIDES, compose_eval

from conftest import compose_cfg
from relift_pl.evaluate import evaluate
from relift_pl.rollout.base import SamplingParams
from relift_pl.rollout.hf import HFRolloutEngine
from relift_pl.train import build
from toy_overrides import QUICK_TOY

K = 4


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The quick toy base and its tokenizer, and 8 of its level-1..4 test prompts."""
    cfg = compose_cfg(QUICK_TOY, output_dir=tmp_path_factory.mktemp("toy"))
    _, module, datamodule = build(cfg)
    datamodule.setup_eval_sets()
    prompts = [row["prompt_ids"] for rows in datamodule.eval_sets.values() for row in rows[:2]]
    return module.policy, module.tokenizer, prompts


@pytest.mark.parametrize(("decode", "share"), [("loop", True), ("loop", False), ("generate", True)])
def test_k_greedy_samples_are_one_greedy_sample_repeated(toy, decode, share):
    policy, tokenizer, prompts = toy
    engine = HFRolloutEngine(decode=decode, share_prompt_prefill=share)
    engine.bind(policy, tokenizer)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    one = engine.generate(prompts, greedy)
    many = engine.generate(prompts, SamplingParams(n=K, temperature=0.0, max_new_tokens=24))
    assert torch.equal(many.response_ids, one.response_ids.repeat_interleave(K, dim=0))
    assert torch.equal(many.response_mask, one.response_mask.repeat_interleave(K, dim=0))
    assert many.finish_reasons == [r for r in one.finish_reasons for _ in range(K)]


def test_generate_alone_refuses_k_greedy_samples(toy):
    """Why the evaluation samples once: without the shared prefill, generate raises."""
    policy, tokenizer, prompts = toy
    engine = HFRolloutEngine(decode="generate", share_prompt_prefill=False)
    engine.bind(policy, tokenizer)
    with pytest.raises(ValueError, match="num_return_sequences"):
        engine.generate(prompts, SamplingParams(n=K, temperature=0.0, max_new_tokens=24))


def test_greedy_evaluation_with_k_samples_scores_like_k_1(tmp_path):
    engine = ["rollout.engine.decode=generate", "rollout.engine.share_prompt_prefill=false",
              "callbacks.evaluation.temperature=0"]  # the engine that refuses n > 1 at T=0
    with_k = evaluate(compose_eval([*EVAL_OVERRIDES, *engine, f"callbacks.evaluation.k={K}"],
                                   tmp_path / "k"))
    with_1 = evaluate(compose_eval([*EVAL_OVERRIDES, *engine, "callbacks.evaluation.k=1"],
                                   tmp_path / "one"))
    for k_score, one_score in zip(with_k.scores, with_1.scores, strict=True):
        assert (k_score.k, one_score.k) == (K, 1)
        # Every problem's k responses are the same: avg@k = pass@k = avg@1.
        assert k_score.avg_at_k == k_score.pass_at_k == one_score.avg_at_k
        assert k_score.per_problem == one_score.per_problem
        assert set(k_score.per_problem.values()) <= {0.0, 1.0}
    assert with_k.metrics["val/avg"] == with_1.metrics["val/avg"]
    assert 0 < with_k.metrics["val/avg"] < 1  # the stub reward makes it non-trivial
