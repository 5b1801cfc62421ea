"""Loss aggregation, policy-gradient and SFT losses on hand-made tensors."""

import math

import pytest
import torch

from relift_pl.algorithms import PolicyGradientLoss, SFTLoss, aggregate_loss, kl_k3

# 2x3 example: kept tokens 1, 2 (row 0) and 4 (row 1).
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
MODES = ["token_mean", "seq_mean_token_mean", "constant"]


@pytest.mark.parametrize(
    ("mode", "constant", "expected"),
    [
        ("token_mean", None, 7.0 / 3.0),  # (1 + 2 + 4) / 3 tokens
        ("seq_mean_token_mean", None, 2.75),  # ((1 + 2) / 2 + 4 / 1) / 2 seqs
        ("constant", None, 7.0 / 6.0),  # 7 / (2 seqs * T=3)
        ("constant", 4.0, 7.0 / 8.0),  # 7 / (2 seqs * 4)
    ],
)
def test_aggregate_modes_by_hand(mode, constant, expected):
    result = aggregate_loss(VALUES, MASK, mode, constant=constant)
    torch.testing.assert_close(result, torch.tensor(expected))


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_is_microbatch_invariant_with_global_counts(mode):
    torch.manual_seed(0)
    values = torch.randn(4, 5)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float
    )
    counts = {"num_tokens": mask.sum(), "num_seqs": 4, "constant": 8.0}
    whole = aggregate_loss(values, mask, mode, **counts)
    # Uneven split (1 + 3 rows): local token means would NOT add up; global counts do.
    parts = [
        aggregate_loss(values[rows], mask[rows], mode, **counts)
        for rows in (slice(0, 1), slice(1, 4))
    ]
    torch.testing.assert_close(sum(parts), whole)


def test_aggregate_ignores_nan_under_mask():
    values = VALUES.clone()
    values[0, 2] = float("nan")
    torch.testing.assert_close(
        aggregate_loss(values, MASK.bool(), "token_mean"), torch.tensor(7 / 3)
    )


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="agg_mode"):
        aggregate_loss(VALUES, MASK, "sum")


def test_kl_k3_by_hand():
    logprobs = torch.zeros(1, 3)
    ref = torch.tensor([[0.0, math.log(2.0), -1.0]])
    # d = ref - logp: 0 -> 0; ln 2 -> 2 - ln 2 - 1 = 0.30685; -1 -> e^-1 + 1 - 1 = 0.36788.
    expected = torch.tensor([[0.0, 1.0 - math.log(2.0), math.exp(-1.0)]])
    kl = kl_k3(logprobs, ref)
    torch.testing.assert_close(kl, expected)
    assert (kl[:, 1:] > 0).all()


# Ratio 1 with A = [1, -3] over MASK: token losses -1, -1 (row 0) and +3 (row 1).
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token_mean", 1.0 / 3.0),  # (-1 - 1 + 3) / 3 tokens
        ("seq_mean_token_mean", 1.0),  # (-1 + 3) / 2 = -mean(A)
        ("constant", 1.0 / 6.0),  # (-1 - 1 + 3) / (2 seqs * T=3)
    ],
)
def test_pg_loss_at_ratio_one(mode, expected):
    logprobs = torch.full((2, 3), -0.7)
    loss, metrics = PolicyGradientLoss(agg_mode=mode)(
        logprobs, logprobs.clone(), torch.tensor([1.0, -3.0]), MASK
    )
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(1.0))


# Four one-token rows: A = [2, -1, 1, 1], ratio = [1.5, 0.5, 1, 0.5], old logprobs 0.
ADV = torch.tensor([2.0, -1.0, 1.0, 1.0])
RATIO = torch.tensor([[1.5], [0.5], [1.0], [0.5]])


def _clip_case(clip):
    logprobs = RATIO.log().requires_grad_()
    pg = PolicyGradientLoss(clip=clip, agg_mode="token_mean")
    loss, metrics = pg(logprobs, torch.zeros(4, 1), ADV, torch.ones(4, 1))
    loss.backward()
    return loss, metrics, logprobs.grad


def test_pg_loss_clip_higher():
    # Row 0: A > 0, ratio 1.5 > 1.28 -> -2 * 1.28 = -2.56 (clipped).
    # Row 1: A < 0, ratio 0.5 < 0.8 -> -(-1) * 0.8 = 0.8 (clipped).
    # Row 2: ratio 1 -> -1. Row 3: A > 0, ratio 0.5 moves against A: no clip, -0.5.
    # Mean (-2.56 + 0.8 - 1 - 0.5) / 4 = -0.815; d/dlogp of unclipped -A * ratio is -A * ratio / 4.
    loss, metrics, grad = _clip_case(clip=True)
    torch.testing.assert_close(loss, torch.tensor(-0.815))
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(0.5))
    torch.testing.assert_close(grad, torch.tensor([[0.0], [0.0], [-0.25], [-0.125]]))


def test_pg_loss_without_clip():
    # -A * ratio = [-3, 0.5, -1, -0.5], mean -1; gradient -A * ratio / 4.
    loss, metrics, grad = _clip_case(clip=False)
    torch.testing.assert_close(loss, torch.tensor(-1.0))
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(0.0))
    torch.testing.assert_close(grad, torch.tensor([[-0.75], [0.125], [-0.25], [-0.125]]))


def test_pg_entropy_bonus_and_kl_penalty():
    # Ratio 1, A = 0: the pg term is 0, so loss = -0.1 * H + 0.5 * KL.
    # H = 2 everywhere; KL per token 0 and 1 - ln 2 -> token mean (1 - ln 2) / 2.
    logprobs = torch.zeros(1, 2)
    ref = torch.tensor([[0.0, math.log(2.0)]])
    entropy = torch.full((1, 2), 2.0)
    pg = PolicyGradientLoss(agg_mode="token_mean", entropy_coef=0.1, kl_coef=0.5)
    loss, metrics = pg(
        logprobs, logprobs, torch.zeros(1), torch.ones(1, 2), entropy=entropy, ref_logprobs=ref
    )
    kl = (1.0 - math.log(2.0)) / 2.0
    torch.testing.assert_close(loss, torch.tensor(-0.2 + 0.5 * kl))
    torch.testing.assert_close(metrics["entropy"], torch.tensor(2.0))
    torch.testing.assert_close(metrics["kl"], torch.tensor(kl))


def test_pg_is_weights_scale_tokens():
    # A = 1, ratio 1: token losses -1 * [0.5, 2.0], mean -1.25; the weights get no gradient.
    is_weights = torch.tensor([[0.5, 2.0]], requires_grad=True)
    logprobs = torch.zeros(1, 2, requires_grad=True)
    loss, _ = PolicyGradientLoss(agg_mode="token_mean")(
        logprobs, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), is_weights=is_weights
    )
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-1.25))
    assert is_weights.grad is None


@pytest.mark.parametrize("mode", MODES)
def test_pg_loss_is_microbatch_invariant(mode):
    torch.manual_seed(0)
    logprobs, old = torch.randn(4, 3) * 0.1, torch.randn(4, 3) * 0.1
    advantages, mask = torch.randn(4), (torch.rand(4, 3) > 0.3).float()
    mask[:, 0] = 1.0
    pg = PolicyGradientLoss(clip=True, agg_mode=mode, loss_constant=5.0)
    counts = {"num_tokens": mask.sum(), "num_seqs": 4}
    whole, _ = pg(logprobs, old, advantages, mask, **counts)
    halves = [
        pg(logprobs[r], old[r], advantages[r], mask[r], **counts)[0] for r in ([0], [1, 2, 3])
    ]
    torch.testing.assert_close(sum(halves), whole)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"clip_ratio_low": -0.1}, "clip_ratio_low"),
        ({"clip_ratio_high": -0.1}, "clip_ratio_high"),
        ({"entropy_coef": -1.0}, "entropy_coef"),
        ({"kl_coef": -1.0}, "kl_coef"),
        ({"loss_constant": 0.0}, "loss_constant"),
        ({"agg_mode": "sum"}, "agg_mode"),
    ],
)
def test_pg_constructor_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PolicyGradientLoss(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"kl_coef": 0.1}, "ref_logprobs"), ({"entropy_coef": 0.1}, "entropy")]
)
def test_pg_missing_inputs_raise(kwargs, name):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=name):
        PolicyGradientLoss(**kwargs)(x, x, torch.zeros(1), torch.ones(1, 2))


def test_sft_loss_ignores_prompt_tokens():
    # Mask [0, 1, 1]: NLL token mean (1 + 2) / 2 = 1.5; the prompt token's log-prob is irrelevant.
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    logprobs = torch.tensor([[-5.0, -1.0, -2.0]], requires_grad=True)
    loss, metrics = SFTLoss()(logprobs, mask)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(1.5))
    torch.testing.assert_close(metrics["nll"], torch.tensor(1.5))
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.5, -0.5]]))
    changed, _ = SFTLoss()(torch.tensor([[-100.0, -1.0, -2.0]]), mask)
    torch.testing.assert_close(changed, loss.detach())


def test_sft_entropy_bonus():
    # Entropy token mean over the demonstration tokens (1 + 3) / 2 = 2: loss 1.5 - 0.1 * 2 = 1.3.
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    entropy = torch.tensor([[9.0, 1.0, 3.0]])
    loss, metrics = SFTLoss(entropy_coef=0.1)(
        torch.tensor([[-5.0, -1.0, -2.0]]), mask, entropy=entropy
    )
    torch.testing.assert_close(loss, torch.tensor(1.3))
    torch.testing.assert_close(metrics["entropy"], torch.tensor(2.0))


def test_group_token_mean_by_hand():
    # Rows 0 and 1 in one group (3 tokens: 1, 2, 4), row 2 alone (2 tokens: 7, 8):
    # mean of the groups' token means ((1 + 2 + 4) / 3 + (7 + 8) / 2) / 2 = (7/3 + 7.5) / 2.
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    group_tokens = torch.tensor([3.0, 3.0, 2.0])
    expected = torch.tensor((7 / 3 + 7.5) / 2)
    torch.testing.assert_close(
        aggregate_loss(values, mask, "group_token_mean", group_tokens=group_tokens), expected
    )
    # Split across micro-batches with the global group count, the parts add up.
    parts = [
        aggregate_loss(values[r], mask[r], "group_token_mean", group_tokens=group_tokens[r],
                       num_groups=2)
        for r in ([0], [1, 2])
    ]  # fmt: skip
    torch.testing.assert_close(sum(parts), expected)


def test_group_token_mean_spans_the_other_modes():
    # One row per group: seq_mean_token_mean; one group of every row: token_mean.
    lengths = MASK.sum(-1)
    torch.testing.assert_close(
        aggregate_loss(VALUES, MASK, "group_token_mean", group_tokens=lengths),
        aggregate_loss(VALUES, MASK, "seq_mean_token_mean"),
    )
    torch.testing.assert_close(
        aggregate_loss(VALUES, MASK, "group_token_mean", group_tokens=lengths * 0 + MASK.sum(),
                       num_groups=1),
        aggregate_loss(VALUES, MASK, "token_mean"),
    )  # fmt: skip


def test_pg_entropy_per_group_is_summed_over_groups_per_sequence():
    # Two rows in two groups of 1 and 2 tokens, entropies 3 | 1, 2: group token means 3 and 1.5,
    # summed 4.5, over N=2 sequences 2.25; weight 0.1 -> -0.225 next to a zero pg term.
    # The pg term's own normaliser (constant 4) would give (3 + 1 + 2) / (2 * 4) = 0.75 instead.
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    entropy = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    zeros = torch.zeros(2, 2)
    pg = PolicyGradientLoss(agg_mode="constant", loss_constant=4.0, entropy_coef=0.1,
                            entropy_agg_mode="group_token_mean", entropy_group_max_tokens=8)
    loss, _ = pg(zeros, zeros, torch.zeros(2), mask, entropy=entropy,
                 group_tokens=torch.tensor([1.0, 2.0]))  # fmt: skip
    torch.testing.assert_close(loss, torch.tensor(-0.225))
    same, _ = PolicyGradientLoss(agg_mode="constant", loss_constant=4.0, entropy_coef=0.1)(
        zeros, zeros, torch.zeros(2), mask, entropy=entropy
    )
    torch.testing.assert_close(same, torch.tensor(-0.075))


def test_sft_group_token_mean_weighs_groups_not_tokens():
    # Groups {row 0: 1 token, NLL 4} and {row 1: 3 tokens, NLL 1 each}: mean of token means
    # (4 + 1) / 2 = 2.5, where the token mean would be (4 + 3) / 4 = 1.75.
    logprobs = torch.tensor([[-4.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = SFTLoss(agg_mode="group_token_mean", group_rows=1)(
        logprobs, mask, group_tokens=torch.tensor([1.0, 3.0]), num_groups=2
    )
    torch.testing.assert_close(loss, torch.tensor(2.5))


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: PolicyGradientLoss(agg_mode="group_token_mean"), "entropy term only"),
        (lambda: PolicyGradientLoss(entropy_agg_mode="group_token_mean"), "entropy_group_max_tokens"),
        (lambda: PolicyGradientLoss(entropy_agg_mode="group_token_mean", entropy_group_max_tokens=8,
                                    entropy_group_shards=0), "entropy_group_shards"),
        (lambda: SFTLoss(agg_mode="group_token_mean"), "group_rows"),
        (lambda: aggregate_loss(VALUES, MASK, "group_token_mean"), "group_tokens"),
    ],
)
def test_group_token_mean_needs_its_groups(make, name):
    with pytest.raises(ValueError, match=name):
        make()
