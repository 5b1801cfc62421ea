"""``algorithm=luffy`` on the toy world: demonstrations join their rollout groups (mixed-policy
GRPO), are scored by the same reward, advantaged with their group and trained with policy shaping;
counted as used, logged under ``luffy/*``; and nothing changes for prompts without one."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

import relift_pl.module as module_lib
from conftest import compose_cfg
from relift_pl.algorithms import group_advantages
from relift_pl.data import ReLIFTDataModule
from tests_helpers import fit_with_callbacks
from toy_overrides import QUIET_TOY

RUN = [*QUIET_TOY, "algorithm=luffy"]
G = 4  # QUICK_TOY's group size; max_new_tokens 24: level-3 demos (22-29 tokens) may not fit
MAX_NEW = 24


class Steps(L.Callback):
    """Per training step: the rows, the RL record and the reduced metrics."""

    def __init__(self) -> None:
        self.records, self.metrics = [], []

    def on_rl_step_end(self, trainer, module, record) -> None:
        self.records.append(record)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _run(tmp_path, *overrides: str, callbacks=()):
    steps = Steps()
    cfg = compose_cfg([*RUN, *overrides], output_dir=tmp_path)
    return fit_with_callbacks(cfg, [steps, *callbacks]), steps  # every config check of train.py


@pytest.fixture(scope="module")
def luffy_run(tmp_path_factory):
    """Two LUFFY steps on levels 1-4, with what ``rl_update`` received."""
    updates = []
    original = module_lib.rl_update

    def spy(learner, algo, rollout, advantages, metrics, demos=None, mixed_ids=None, **kwargs):
        updates.append((rollout, advantages.clone(), mixed_ids))
        return original(learner, algo, rollout, advantages, metrics, demos, mixed_ids, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(module_lib, "rl_update", spy)
    try:
        module, steps = _run(tmp_path_factory.mktemp("luffy"), "max_steps=2")
    finally:
        patch.undo()
    return module, steps, updates


def test_each_demonstration_takes_the_last_place_of_its_group(luffy_run):
    module, steps, updates = luffy_run
    assert (module.rl_step, module.sft_step, len(module.buffer)) == (2, 0, 0)
    assert list(module._opt_index) == ["rl"]  # no SFT optimizer: LUFFY has no SFT steps
    mixed_total = 0
    for record, (rollout, _, mixed_ids), logged in zip(steps.records, updates, steps.metrics, strict=True):
        fits = [len(row["demo_ids"]) <= MAX_NEW for row in record.rows]
        expected = torch.tensor([[False] * (G - 1) + [fit] for fit in fits]).view(-1)
        assert torch.equal(rollout.off_policy, expected)
        assert mixed_ids == [str(row["id"]) for row, fit in zip(record.rows, fits) if fit]
        for i, (row, fit) in enumerate(zip(record.rows, fits)):
            if fit:  # the response the reward scored is the demonstration itself
                n = len(row["demo_ids"])
                assert rollout.response_ids[i * G + G - 1, :n].tolist() == row["demo_ids"]
                assert int(rollout.response_mask[i * G + G - 1].sum()) == n
        assert logged["luffy/demos_mixed"] == sum(fits)
        assert logged["luffy/demos_too_long"] == len(fits) - sum(fits)
        mixed_total += sum(fits)
    assert mixed_total > 0
    assert len(module.demos_used) == mixed_total  # every mixed demo entered an applied step


def test_demonstrations_are_scored_and_advantaged_with_their_group(luffy_run):
    _, steps, updates = luffy_run
    for record, (rollout, advantages, _), logged in zip(steps.records, updates, steps.metrics, strict=True):
        rewards = record.group_rewards.reshape(-1)  # the same reward function scored every row
        demo_rows = rollout.off_policy
        # The toy's demonstrations are correct, so each scored 1.
        assert (rewards[demo_rows] == 1).all()
        assert logged["luffy/demo_reward_mean"] == 1.0
        # Advantages: r - mean over the mixed group (demonstration included; no std).
        torch.testing.assert_close(advantages.cpu(), group_advantages(rewards, G))
        # train/reward_mean describes the policy's own samples only.
        assert logged["train/reward_mean"] == pytest.approx(float(rewards[~demo_rows].mean()))


def test_luffy_metrics_are_logged(luffy_run):
    _, steps, _ = luffy_run
    for logged in steps.metrics:
        luffy = {k: v for k, v in logged.items() if k.startswith("luffy/")}
        assert {"luffy/off_policy_token_frac", "luffy/off_policy_prob", "luffy/shaped_prob",
                "luffy/demo_reward_mean", "luffy/demos_mixed", "luffy/demos_too_long"} <= set(luffy)
        assert all(math.isfinite(v) for v in luffy.values())
        assert 0 < logged["luffy/off_policy_token_frac"] < 1
        # Token means of p and of f(p) = p / (p + 0.1) < 1 / 1.1.
        assert 0 < logged["luffy/off_policy_prob"] < 1
        assert 0 < logged["luffy/shaped_prob"] < 1 / 1.1
        assert logged["train/demos_used_frac"] > 0
        # Each demonstration's least likely token: a log-prob below the token mean's log, and
        # the shaping weight gamma p / (p + gamma)^2 <= 1/4 (its value at p = gamma) there.
        assert logged["luffy/min_token_logprob"] < math.log(logged["luffy/off_policy_prob"])
        assert 0 < logged["luffy/min_token_weight"] <= 0.25


class WrongAnswers(L.Callback):
    """Every prompt's gold answer replaced, so its (unchanged) demonstration is wrong."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        for row in batch:
            row["answer"] = "123456"


def test_a_wrong_demonstration_is_not_rewarded(tmp_path):
    _, steps = _run(tmp_path, "max_steps=1", "data.train_rows.levels=[1]",
                    callbacks=[WrongAnswers()])
    record = steps.records[0]
    assert (record.group_rewards[:, -1] == 0).all()  # each group's last row: its demonstration
    assert steps.metrics[0]["luffy/demos_mixed"] == 4
    assert steps.metrics[0]["luffy/demo_reward_mean"] == 0.0


def test_without_demonstrations_luffy_is_grpo(tmp_path, monkeypatch):
    # Demonstrations longer than 5 tokens are dropped by the data (all of the toy's): every group
    # keeps its G samples, and the update is GRPO's, bit for bit. (Setup refuses such a run,
    # test_demonstration_check.py; the update must still be GRPO's.)
    monkeypatch.setattr(ReLIFTDataModule, "check_demonstrations", lambda self, needed_by: None)
    common = ["max_steps=2", "data.max_demo_length=5"]
    luffy, steps = _run(tmp_path / "luffy", *common)
    grpo, _ = _run(tmp_path / "grpo", *common, "algorithm=grpo")
    assert [m["luffy/demos_mixed"] for m in steps.metrics] == [0.0, 0.0]
    assert len(luffy.demos_used) == 0
    for (name, a), b in zip(luffy.policy.named_parameters(), grpo.policy.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_update_and_metrics_do_not_depend_on_micro_batching(tmp_path):
    # 16 rows in one micro-batch or in 6 of at most 3 (demonstration rows spread over them): the
    # same update, and the off-policy token means weighted into the same values.
    common = ["max_steps=1", "data.train_rows.levels=[1,2]",
              "algorithm.rl_optimizer._target_=torch.optim.SGD", "algorithm.rl_optimizer.lr=0.1",
              "algorithm.rl_optimizer.weight_decay=0", "algorithm.rl_grad_clip=1e9"]
    whole, whole_steps = _run(tmp_path / "a", *common, "algorithm.micro_batch_size=16")
    split, split_steps = _run(tmp_path / "b", *common, "algorithm.micro_batch_size=3")
    for key in ("rl/loss", "luffy/off_policy_prob", "luffy/shaped_prob", "luffy/off_policy_token_frac",
                "luffy/min_token_logprob", "luffy/min_token_weight"):
        assert split_steps.metrics[0][key] == pytest.approx(whole_steps.metrics[0][key], rel=1e-5)
    for a, b in zip(whole.policy.parameters(), split.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


class DemosInFirstHalf(L.Callback):
    """Only the first half of each batch keeps its demonstration."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        for row in batch[len(batch) // 2 :]:
            row.pop("demo_ids", None)


def test_demonstration_means_do_not_depend_on_mini_batches(tmp_path):
    # Two mini-batches, the second without demonstration tokens: the means over demonstration
    # tokens are those of one mini-batch (learning rate 0: both see the same policy), not halved.
    common = ["max_steps=1", "data.train_rows.levels=[1,2]", "algorithm.rl_optimizer.lr=0"]
    one, one_steps = _run(tmp_path / "a", *common, callbacks=[DemosInFirstHalf()])
    two, two_steps = _run(tmp_path / "b", *common, "algorithm.num_mini_batches=2",
                          callbacks=[DemosInFirstHalf()])
    assert one_steps.metrics[0]["luffy/demos_mixed"] == two_steps.metrics[0]["luffy/demos_mixed"] == 2
    for key in ("luffy/off_policy_prob", "luffy/shaped_prob", "luffy/off_policy_token_frac"):
        assert two_steps.metrics[0][key] == pytest.approx(one_steps.metrics[0][key], rel=1e-5), key
