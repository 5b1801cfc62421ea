"""GRPO / Dr.GRPO group advantages on hand-made rewards."""

import math

import pytest
import torch

from relift_pl.algorithms import group_advantages


@pytest.mark.parametrize("scale_by_std", [False, True])
def test_equal_rewards_give_zero_advantages(scale_by_std):
    # Every group is all-correct or all-wrong: r_i == mean, so A == 0 (and no 0/0 with std on).
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    advantages = group_advantages(rewards, group_size=3, scale_by_std=scale_by_std)
    torch.testing.assert_close(advantages, torch.zeros(6))


def test_centred_without_std():
    # Group 1 mean 0.25 -> [0.75, -0.25, -0.25, -0.25]; group 2 mean 0.5 -> [0.5, 0.5, -0.5, -0.5].
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    torch.testing.assert_close(group_advantages(rewards, group_size=4), expected)


def test_scaled_by_unbiased_std():
    # Group 1: squared deviations 0.5625 + 3 * 0.0625 = 0.75, / (G - 1) = 0.25, std 0.5
    #   -> [1.5, -0.5, -0.5, -0.5].
    # Group 2: squared deviations 4 * 0.25 = 1, / 3, std 1/sqrt(3) -> +-0.5 * sqrt(3) = +-0.866.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    h = 0.5 * math.sqrt(3.0)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, h, h, -h, -h])
    advantages = group_advantages(rewards, group_size=4, scale_by_std=True)
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=1e-5)


def test_group_of_one_is_zero_not_nan():
    advantages = group_advantages(torch.tensor([1.0, 0.0]), group_size=1, scale_by_std=True)
    torch.testing.assert_close(advantages, torch.zeros(2))


def test_integer_rewards_become_float():
    advantages = group_advantages(torch.tensor([1, 0]), group_size=2)
    torch.testing.assert_close(advantages, torch.tensor([0.5, -0.5]))


def test_not_divisible_raises():
    with pytest.raises(ValueError, match="not divisible by group_size=2"):
        group_advantages(torch.zeros(5), group_size=2)


def test_bad_group_size_raises():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), group_size=0)
