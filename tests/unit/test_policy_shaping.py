"""LUFFY's policy shaping and the mixed-policy PG loss on hand-made tensors."""

import math

import pytest
import torch

from relift_pl.algorithms import PolicyGradientLoss, group_advantages, policy_shaping
from relift_pl.algorithms.losses import shaping_weight

PROBS = torch.tensor([[1.0, 0.1, 0.01]])


def test_shaping_values_by_hand():
    # f(p) = p / (p + 0.1): 1 / 1.1, 0.1 / 0.2, 0.01 / 0.11.
    shaped = policy_shaping(PROBS.log(), gamma=0.1)
    torch.testing.assert_close(shaped, torch.tensor([[1 / 1.1, 0.5, 1 / 11]]))
    # gamma None: no shaping, f(p) = p (LUFFY's no_reshape ablation).
    torch.testing.assert_close(policy_shaping(PROBS.log(), gamma=None), PROBS)


def test_shaping_gradient_by_hand():
    # d f / d log p = gamma * p / (p + gamma)^2: p = 1 -> 0.1 / 1.21; p = gamma -> 1/4 (the
    # largest); p = 0.01 -> 0.001 / 0.0121 (= the p = 1 value: symmetric in log p around gamma).
    # SFT's weight on grad log p is 1 everywhere, plain IS's is p (1, 0.1, 0.01).
    logprobs = PROBS.log().requires_grad_()
    policy_shaping(logprobs, gamma=0.1).sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.1 / 1.21, 0.25, 0.1 / 1.21]]))


# Row 0 sampled: p = 0.5, old p = 0.25 (ratio 2), A = 1, two tokens, IS weights 0.5.
# Row 1 a demonstration: p = 0.1, A = 2, three tokens; its old p (0.9: ratio 1/9) and IS
# weights must be ignored.
LOGPROBS = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.1, 0.1]]).log()
OLD = torch.tensor([[0.25, 0.25, 0.25], [0.9, 0.9, 0.9]]).log()
ADV = torch.tensor([1.0, 2.0])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
OFF = torch.tensor([False, True])


def test_mixed_loss_by_hand():
    # Row 0 (clip on): max(-1 * 2, -1 * 1.28) = -1.28, x IS 0.5 -> -0.64 per token.
    # Row 1: -2 * f(0.1) = -2 * 0.5 = -1 per token, unclipped, no IS weight.
    # token_mean: (2 * -0.64 + 3 * -1) / 5 = -0.856.
    # Gradient: row 0 clipped (ratio 2 > 1.28 with A > 0) -> 0; row 1: -2 * 0.25 / 5 = -0.1.
    logprobs = LOGPROBS.clone().requires_grad_()
    pg = PolicyGradientLoss(clip=True, agg_mode="token_mean", shaping_gamma=0.1)
    is_weights = torch.full((2, 3), 0.5)
    loss, metrics = pg(logprobs, OLD, ADV, MASK, is_weights=is_weights, off_policy=OFF)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-0.856))
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [-0.1, -0.1, -0.1]]))
    # Means over the demonstration's 3 tokens; the clip counts sampled tokens only (2 of 5).
    torch.testing.assert_close(metrics["off_policy_prob"], torch.tensor(0.1))
    torch.testing.assert_close(metrics["shaped_prob"], torch.tensor(0.5))
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(0.4))


def test_no_shaping_is_the_probability_itself():
    # gamma None: row 1 is -2 * p = -0.2 per token, gradient -2 * p / 5 = -0.04.
    logprobs = LOGPROBS.clone().requires_grad_()
    pg = PolicyGradientLoss(agg_mode="token_mean", shaping_gamma=None)
    loss, metrics = pg(logprobs, OLD, ADV, MASK, off_policy=OFF)
    loss.backward()
    # Row 0 unclipped: -1 * 2 = -2 per token -> (2 * -2 + 3 * -0.2) / 5 = -0.92.
    torch.testing.assert_close(loss, torch.tensor(-0.92))
    torch.testing.assert_close(logprobs.grad[1], torch.full((3,), -0.04))
    torch.testing.assert_close(metrics["shaped_prob"], torch.tensor(0.1))


def test_sampled_rows_are_plain_grpo():
    # The same rows as plain GRPO, with and without demonstration rows around them: identical
    # loss terms and gradients on the sampled rows (global counts fixed, as the update passes).
    torch.manual_seed(0)
    logprobs, old = torch.randn(4, 5) * 0.3 - 1, torch.randn(4, 5) * 0.3 - 1
    advantages, mask = torch.randn(4), (torch.rand(4, 5) > 0.3).float()
    pg = PolicyGradientLoss(clip=True, agg_mode="constant", loss_constant=5.0, entropy_coef=0.01)
    entropy = torch.rand(4, 5)
    counts = {"num_tokens": mask.sum(), "num_seqs": 4}

    def run(off_policy):
        lp = logprobs.clone().requires_grad_()
        loss, _ = pg(lp, old, advantages, mask, entropy=entropy, off_policy=off_policy, **counts)
        loss.backward()
        return loss, lp.grad

    plain_loss, plain_grad = run(None)
    none_off_loss, none_off_grad = run(torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(none_off_loss, plain_loss)
    torch.testing.assert_close(none_off_grad, plain_grad)
    _, mixed_grad = run(torch.tensor([False, True, False, True]))
    torch.testing.assert_close(mixed_grad[[0, 2]], plain_grad[[0, 2]])
    assert not torch.allclose(mixed_grad[[1, 3]], plain_grad[[1, 3]])


def test_shaping_gamma_must_be_positive():
    with pytest.raises(ValueError, match="shaping_gamma"):
        PolicyGradientLoss(shaping_gamma=0.0)


def test_advantages_over_the_mixed_group_by_hand():
    # G = 4, the demonstration last in each group (update/mixing.py).
    # Group 1: samples [0, 1, 0] + demo 1 -> mean 0.5 -> [-0.5, 0.5, -0.5, 0.5]
    #   (over the samples alone the mean would be 1/3: LUFFY's reference run mixes).
    # Group 2: all samples wrong, demo right -> mean 0.25 -> samples -0.25, demo 0.75: the
    #   only group with no GRPO signal gets one from its demonstration.
    # Group 3: all wrong and a wrong demo (scored 0 by the same reward) -> all 0.
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    expected = torch.tensor(
        [-0.5, 0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75, 0.0, 0.0, 0.0, 0.0]
    )
    torch.testing.assert_close(group_advantages(rewards, group_size=4), expected)
    # With std scaling (original GRPO): group 2's unbiased std is sqrt(0.25) = 0.5 -> x2.
    scaled = group_advantages(rewards, group_size=4, scale_by_std=True)
    torch.testing.assert_close(scaled[4:8], torch.tensor([-0.5, -0.5, -0.5, 1.5]), atol=1e-5, rtol=0)
    assert math.isclose(float(scaled[8:].abs().sum()), 0.0)


def test_shaping_weight_is_the_gradient_by_hand():
    # gamma p / (p + gamma)^2 at p = 1, 0.1, 0.01 (as the autograd gradient above); no shaping: p.
    torch.testing.assert_close(shaping_weight(PROBS.log(), 0.1), torch.tensor([[0.1 / 1.21, 0.25, 0.1 / 1.21]]))
    torch.testing.assert_close(shaping_weight(PROBS.log(), None), PROBS)
    # A key token at p = 1e-7 is pushed with weight ~1e-6, where SFT pushes every token with 1.
    assert shaping_weight(torch.tensor(1e-7).log(), 0.1).item() == pytest.approx(1e-6, rel=1e-5)


def test_each_demonstrations_least_likely_token_by_hand():
    # Two demonstration rows (their masked tokens: p = 0.5, 0.01, 0.2 | 0.3, 0.3) and a sampled
    # row with a lower p (0.001) that must not count; row 1's padded position (p = 1e-9) neither.
    logprobs = torch.tensor([[0.5, 0.01, 0.2], [0.3, 0.3, 1e-9], [0.001, 0.5, 0.5]]).log()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    off = torch.tensor([True, True, False])
    loss_fn = PolicyGradientLoss(agg_mode="token_mean", entropy_coef=0.0, shaping_gamma=0.1)
    _, m = loss_fn(logprobs, logprobs, torch.ones(3), mask, off_policy=off)
    assert m["off_rows"] == 2
    assert m["min_token_logprob_sum"].item() == pytest.approx(math.log(0.01) + math.log(0.3), rel=1e-5)
    weight = 0.1 * 0.01 / 0.11**2 + 0.1 * 0.3 / 0.4**2
    assert m["min_token_weight_sum"].item() == pytest.approx(weight, rel=1e-5)
