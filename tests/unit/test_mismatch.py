"""Engine-vs-trainer log-prob difference and truncated importance-sampling weights, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from relift_pl.algorithms.mismatch import logprob_diff, truncated_is_weights


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
