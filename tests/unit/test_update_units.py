"""The update units on a bare model, without a LightningModule or a Trainer: a Learner holds the
policy, a plain SGD optimizer (lr 1, no clip: the step subtracts the gradient) and the counters.
Expected gradients come from each row scored alone, unpadded, by the model's own forward."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from relift_pl.algorithms import PolicyGradientLoss, SFTLoss
from relift_pl.config import AlgorithmConfig
from relift_pl.metrics import StepMetrics
from relift_pl.rollout.base import RolloutBatch, left_pad, right_pad
from relift_pl.update import Learner, rl_update, sft_update

PAD = 0
ROWS = [  # demonstrations of unequal lengths: a token mean weighs each token alike
    {"id": "a", "prompt_ids": [3, 4, 5], "demo_ids": [6, 7, 1]},
    {"id": "b", "prompt_ids": [8, 9], "demo_ids": [10, 11, 12, 13, 1]},
]


def tiny_policy() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).float()


def learner(policy, **counters) -> Learner:
    learner = Learner(policy, torch.optim.SGD(policy.parameters(), lr=1.0))
    for key, value in counters.items():
        setattr(learner.counters, key, value)
    return learner


def algorithm(**overrides) -> AlgorithmConfig:
    knobs = dict(group_size=2, micro_batch_size=1, sft_micro_batch_size=1, rl_grad_clip=1e9,
                 sft_grad_clip=1e9, pg_loss=PolicyGradientLoss(agg_mode="token_mean"), sft_loss=SFTLoss())
    return AlgorithmConfig(**{**knobs, **overrides})


def row_logprobs(policy, prompt: list[int], response: list[int]) -> torch.Tensor:
    """[len(response)] log-probs of ``response`` after ``prompt``, the row scored alone."""
    logits = policy(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def stepped(policy, loss: torch.Tensor) -> list[torch.Tensor]:
    """The parameters after one SGD step (lr 1) on ``loss``."""
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    return [(p - g).detach() for p, g in zip(policy.parameters(), grads, strict=True)]


def test_sft_update_steps_on_the_token_mean_nll_and_returns_the_rows_it_learned_from():
    policy = tiny_policy()
    # Token mean over both rows' 8 demonstration tokens (not a mean of the two rows' means).
    nll = -sum(row_logprobs(policy, r["prompt_ids"], r["demo_ids"]).sum() for r in ROWS) / 8
    expected = stepped(policy, nll)
    unit, metrics = learner(policy), StepMetrics()

    used = sft_update(unit, algorithm(), ROWS, metrics, pad_id=PAD)  # two micro-batches of one row

    assert used == ["a", "b"]
    assert unit.counters.weights_version == 1 and unit.counters.consecutive_skips == {"sft": 0}
    for param, want in zip(policy.parameters(), expected, strict=True):
        torch.testing.assert_close(param.detach(), want, rtol=1e-5, atol=1e-6)
    values = metrics.reduce()
    assert values["sft/demo_tokens"] == 8.0
    assert values["sft/loss"] == pytest.approx(float(nll.detach()), rel=1e-5)


def test_a_non_finite_gradient_is_skipped_counted_and_stops_the_run_when_repeated():
    policy = tiny_policy()
    before = [p.detach().clone() for p in policy.parameters()]
    next(policy.parameters()).register_hook(lambda grad: grad * float("nan"))
    unit, algo = learner(policy, skipped_steps=3), algorithm(max_consecutive_skips=2)

    assert sft_update(unit, algo, ROWS, StepMetrics(), pad_id=PAD) == []  # nothing learned
    assert (unit.counters.skipped_steps, unit.counters.consecutive_skips) == (4, {"sft": 1})
    assert unit.counters.weights_version == 0
    assert all(torch.equal(p, b) for p, b in zip(policy.parameters(), before, strict=True))
    unit.step = 7
    with pytest.raises(FloatingPointError, match=r"2 consecutive sft .* at training step 7"):
        sft_update(unit, algo, ROWS, StepMetrics(), pad_id=PAD)


def rollout() -> tuple[RolloutBatch, torch.Tensor, list[tuple[list[int], list[int]]]]:
    """Two prompts x G=2 responses of unequal lengths, padded as an engine returns them."""
    pairs = [([3, 4], [5, 6, 1]), ([3, 4], [7, 1]), ([8, 9, 10], [11, 1]), ([8, 9, 10], [12, 13, 14, 1])]
    prompt_ids, prompt_mask = left_pad([p for p, _ in pairs], PAD)
    response_ids, response_mask = right_pad([r for _, r in pairs], PAD)
    batch = RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, ["stop"] * 4)
    return batch, torch.tensor([1.0, -1.0, 0.5, -0.5]), pairs


def test_rl_update_is_the_advantage_weighted_token_mean_and_counts_its_mixed_demonstrations():
    policy = tiny_policy()
    batch, advantages, pairs = rollout()
    # One optimizer step: the ratio is 1 with the gradient of the log-prob, so the loss's gradient
    # is that of -sum_i A_i sum_t logp_it / 11 response tokens.
    pg = -sum(a * row_logprobs(policy, p, r).sum() for a, (p, r) in zip(advantages, pairs, strict=True)) / 11
    expected = stepped(policy, pg)
    unit = learner(policy)

    used = rl_update(unit, algorithm(), batch, advantages, StepMetrics(), mixed_ids=["demo-1"])

    assert used == ["demo-1"] and unit.counters.weights_version == 1
    for param, want in zip(policy.parameters(), expected, strict=True):
        torch.testing.assert_close(param.detach(), want, rtol=1e-5, atol=1e-6)


def test_rl_update_takes_one_optimizer_step_per_mini_batch():
    batch, advantages, _ = rollout()
    unit, metrics = learner(tiny_policy()), StepMetrics()
    rl_update(unit, algorithm(num_mini_batches=2), batch, advantages, metrics)
    assert unit.counters.weights_version == 2 and unit.counters.consecutive_skips == {"rl": 0}
    assert {"rl/loss", "rl/grad_norm", "rl/entropy"} <= metrics.reduce().keys()
