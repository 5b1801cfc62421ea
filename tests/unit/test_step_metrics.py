"""StepMetrics in one process: accumulation, kinds, and exact values whatever the default dtype."""

import pytest
import torch

from relift_pl.metrics import StepMetrics


def test_values_stay_exact_under_a_bf16_default_dtype():
    # bf16-true sets the default dtype to bf16 inside a training step: 301 would become 300.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        metrics = StepMetrics()
        metrics.add("train/rl_step", 301, reduce="same")
        metrics.add("perf/trained_tokens", 123457)
        metrics.add_mean("train/reward_mean", 1.0, 3.0)
        values = metrics.reduce()
    finally:
        torch.set_default_dtype(previous)
    assert values == {"train/rl_step": 301.0, "perf/trained_tokens": 123457.0,
                      "train/reward_mean": pytest.approx(1 / 3)}


def test_a_key_keeps_its_reduction():
    metrics = StepMetrics()
    metrics.add("x", 1.0, reduce="max")
    metrics.add("x", 3.0, reduce="max")
    metrics.add("x", 2.0, reduce="max")
    assert metrics.reduce() == {"x": 3.0}
    with pytest.raises(ValueError, match="metric x is reduced by max, not sum"):
        metrics.add("x", 1.0)


def test_a_mean_over_no_item_is_left_out():
    # A LUFFY step without demonstrations: their mean log-prob is no figure, not 0 (log p = 0
    # would read as "the policy is sure of every demonstration token").
    metrics = StepMetrics()
    metrics.add_mean("luffy/min_token_logprob", torch.tensor(0.0), torch.tensor(0.0))
    metrics.add_mean("train/reward_mean", 2.0, 4.0)
    assert metrics.reduce() == {"train/reward_mean": 0.5}
