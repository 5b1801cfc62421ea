"""Engine-vs-trainer log-prob difference and truncated importance-sampling weights, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from relift_pl.algorithms.mismatch import (
    BF16_MEAN_BOUND,
    FP32_MAX_BOUND,
    default_logprob_bounds,
    logprob_diff,
    resolve_logprob_bounds,
    truncated_is_weights,
)


def test_logprob_diff_is_absolute_and_masked():
    trainer = torch.tensor([[-1.0, -2.0, -3.0]])
    engine = torch.tensor([[-1.5, -1.0, 99.0]])  # the last position is padding garbage
    mask = torch.tensor([[1, 1, 0]])
    # |-1 - -1.5| = 0.5, |-2 - -1| = 1, masked -> 0
    assert torch.allclose(logprob_diff(trainer, engine, mask), torch.tensor([[0.5, 1.0, 0.0]]))


def test_tis_weights_are_ratios_capped_and_masked():
    trainer = torch.tensor([[-1.0, -1.0, -1.0, -50.0]])
    engine = torch.tensor([[-1.0, -1.5, -4.0, 80.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    weights = truncated_is_weights(trainer, engine, mask, cap=2.0)
    # exp(0) = 1, exp(0.5) = 1.6487, exp(3) = 20.1 -> capped at 2, masked -> 0
    expected = torch.tensor([[1.0, math.exp(0.5), 2.0, 0.0]])
    assert torch.allclose(weights, expected)
    assert not weights.requires_grad


def test_tis_weights_stay_finite_for_huge_log_ratios():
    trainer = torch.tensor([[0.0]], requires_grad=True)
    engine = torch.tensor([[-1e6]])
    weights = truncated_is_weights(trainer, engine, torch.tensor([[1]]), cap=3.0)
    assert weights.item() == pytest.approx(3.0)
    assert not weights.requires_grad


def test_tis_cap_must_be_positive():
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), cap=0.0)


# -- which bound "auto" means ---------------------------------------------------------------------
def test_fp32_on_both_sides_bounds_the_max():
    assert default_logprob_bounds(torch.float32, "32-true") == (FP32_MAX_BOUND, None)
    assert default_logprob_bounds("float32", "32-true", torch.float32) == (FP32_MAX_BOUND, None)


@pytest.mark.parametrize(
    "engine, precision, params",
    [
        (torch.bfloat16, "32-true", None),  # dtype=auto on a bf16 checkpoint, fp32 master weights
        (torch.float32, "bf16-mixed", None),
        (torch.float32, "bf16-true", None),
        (torch.bfloat16, "bf16-mixed", torch.float32),
        ("float16", "32-true", None),
        (torch.float32, "16-mixed", None),
        (torch.float32, "32-true", torch.bfloat16),  # bf16 weights compute in bf16
    ],
)
def test_bf16_anywhere_bounds_the_mean_only(engine, precision, params):
    # Measured on CPU: bf16 maxima reach 0.5 on the toy model while a synced engine's mean stays
    # at 0.002-0.024; the fp32 max bound (0.01) would trip on the first step.
    assert default_logprob_bounds(engine, precision, params) == (None, BF16_MEAN_BOUND)
    assert 0.024 * 3 < BF16_MEAN_BOUND < 0.5


def test_unresolved_engine_dtype_is_refused():
    with pytest.raises(ValueError, match=r"engine_dtype='auto' is not a torch dtype"):
        default_logprob_bounds("auto", "32-true")


def test_resolve_auto_numbers_and_null():
    kw = dict(engine_dtype=torch.bfloat16, trainer_precision="bf16-mixed")
    assert resolve_logprob_bounds("auto", "auto", **kw) == (None, BF16_MEAN_BOUND)
    assert resolve_logprob_bounds(0.5, None, **kw) == (0.5, None)
    assert resolve_logprob_bounds(None, "auto", **kw) == (None, BF16_MEAN_BOUND)
    fp32 = dict(engine_dtype=torch.float32, trainer_precision="32-true")
    assert resolve_logprob_bounds("auto", "auto", **fp32) == (FP32_MAX_BOUND, None)


@pytest.mark.parametrize("key, value", [("max_logprob_diff", 0), ("max_logprob_diff_mean", "big")])
def test_resolve_names_a_malformed_key(key, value):
    values = {"max_logprob_diff": None, "max_logprob_diff_mean": None, key: value}
    with pytest.raises(ValueError, match=rf"rollout\.{key} must be a number > 0, auto or null"):
        resolve_logprob_bounds(
            values["max_logprob_diff"], values["max_logprob_diff_mean"],
            engine_dtype=torch.float32, trainer_precision="32-true",
        )


@pytest.mark.parametrize(
    "sampling", [{"top_p": 0.9}, {"top_k": 20}, {"min_new_tokens": 4}], ids=["top_p", "top_k", "min"]
)
def test_truncated_sampling_turns_auto_off_and_refuses_tis(sampling, caplog):
    # vLLM renormalises its processed log-probs over the tokens it keeps (tests/vllm checks it).
    kw = dict(engine_dtype=torch.float32, trainer_precision="32-true", **sampling)
    with caplog.at_level("WARNING"):
        assert resolve_logprob_bounds("auto", "auto", **kw) == (None, None)
    assert "truncated distribution" in caplog.text
    assert resolve_logprob_bounds(0.3, None, **kw) == (0.3, None)  # an explicit number stays
    with pytest.raises(ValueError, match=r"rollout\.tis_cap=2\.0 with rollout\.sampling\.top_p"):
        resolve_logprob_bounds(None, None, tis_cap=2.0, **kw)
    assert resolve_logprob_bounds(None, None, tis_cap=2.0, engine_dtype=torch.float32,
                                  trainer_precision="32-true") == (None, None)


def test_the_mean_bound_stops_a_run_only_when_exceeded_steps_in_a_row():
    from relift_pl.metrics import StepMetrics
    from relift_pl.update import Learner, LogprobCheck
    from relift_pl.update.rl import MEAN_BOUND_PATIENCE, mismatch_metrics

    learner = Learner(policy=torch.nn.Linear(1, 1))
    check = LogprobCheck(max_diff=None, max_diff_mean=0.1)
    mask = torch.ones(2, 3)
    synced, off = torch.zeros(2, 3), torch.full((2, 3), 0.5)  # mean |diff| 0 and 0.5

    def step(engine):
        mismatch_metrics(learner, check, torch.zeros(2, 3), engine, mask, None, StepMetrics())
        learner.rl_step += 1

    step(off)
    step(synced)  # an unusual batch, then a normal one: the count starts again
    for _ in range(MEAN_BOUND_PATIENCE - 1):
        step(off)
    with pytest.raises(RuntimeError, match=r"on average 0\.5 .*max_logprob_diff_mean=0\.1 on 3 RL steps in a row"):
        step(off)
