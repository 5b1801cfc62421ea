"""The paper's baselines and ablations are configurations of one module: each schedules its
SFT work as documented (checked step by step on short toy runs)."""

from __future__ import annotations

import lightning as L
import torch

from conftest import compose_cfg
from relift_pl.train import build
from toy_overrides import QUICK_TOY

RUN = [
    *QUICK_TOY,
    "logger=csv",
    "callbacks.evaluation.before_training=false",
    "callbacks.evaluation.after_training=false",
    "callbacks.progress_bar=null",
    "data.train_rows.levels=[4]",  # the quick base never solves level 4: every prompt is hardest
]


class StepLog(L.Callback):
    """(rl_step, sft_step, demos used) after every training step."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int]] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.steps.append((module.rl_step, module.sft_step, len(module.demos_used)))


def _run(tmp_path, *overrides: str):
    cfg = compose_cfg([*RUN, "max_steps=4", *overrides], output_dir=tmp_path / "run")
    trainer, module, datamodule = build(cfg)
    log = StepLog()
    trainer.callbacks.insert(0, log)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        module.teardown("fit")
    return module, log.steps


def test_sft_then_rl_runs_sft_on_every_prompt_first_then_only_rl(tmp_path):
    module, steps = _run(tmp_path, "algorithm=sft_then_rl", "algorithm.sft_warmup_steps=2")
    # B=4 prompts per step, all with demonstrations: SFT on all 4 in steps 1-2, RL from step 3.
    assert [(rl, sft) for rl, sft, _ in steps] == [(0, 1), (0, 2), (1, 2), (2, 2)]
    assert steps[1][2] == 8 and steps[-1][2] == 8
    assert len(module.optimizers()) == 2


def test_every_step_schedule_fine_tunes_after_each_rl_step_without_waiting_for_m(tmp_path):
    # Level 4 only: all 4 prompts of every step are hardest; M=8 would need two steps to fill.
    _, relift = _run(tmp_path / "a", "algorithm.buffer_threshold=8")
    _, every = _run(tmp_path / "b", "algorithm=relift_every_step", "algorithm.buffer_threshold=8")
    assert [sft for _, sft, _ in relift] == [0, 1, 1, 2]
    assert [sft for _, sft, _ in every] == [1, 2, 3, 4]
    assert [demos for *_, demos in every] == [4, 8, 12, 16]  # this step's 4 rows each time


def test_uniform_schedule_fine_tunes_every_k_steps_whatever_the_hardness(tmp_path):
    # The uniform schedule buffers every prompt, hard or not, and steps only on steps 2 and 4.
    _, steps = _run(
        tmp_path, "algorithm=relift_uniform", "algorithm.sft_interval=2", "data.train_rows.levels=[1]"
    )
    assert [(rl, sft) for rl, sft, _ in steps] == [(1, 0), (2, 1), (3, 1), (4, 2)]
    assert steps[-1][2] == 8


def test_rl_with_sft_loss_adds_the_sft_gradient_to_the_rl_step(tmp_path):
    # Level 4: every reward is 0, so advantages and the PG gradient are 0 and the RL step is
    # exactly an SGD step on coef x the SFT loss of the batch: the same update as one SFT step
    # with learning rate lr x coef on the same rows.
    sgd = ["algorithm.pg_loss.entropy_coef=0", "algorithm.rl_grad_clip=1e9", "algorithm.sft_grad_clip=1e9"]
    joint, _ = _run(
        tmp_path / "joint", "algorithm=rl_with_sft_loss", "algorithm.sft_loss_coef=0.5", "max_steps=1",
        "algorithm.rl_optimizer._target_=torch.optim.SGD", "algorithm.rl_optimizer.lr=0.2",
        "algorithm.rl_optimizer.weight_decay=0", *sgd,
    )
    sft, _ = _run(
        tmp_path / "sft", "algorithm=sft", "algorithm.buffer_threshold=4", "max_steps=1",
        "algorithm.sft_optimizer._target_=torch.optim.SGD", "algorithm.sft_optimizer.lr=0.1",
        "algorithm.sft_optimizer.weight_decay=0", *sgd,
    )
    assert joint.sft_step == 0 and joint.rl_step == 1 and len(joint.demos_used) == 4
    moved = 0.0
    for (name, a), b in zip(joint.policy.named_parameters(), sft.policy.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0, msg=name)
    base, _ = _run(tmp_path / "zero", "algorithm=grpo", "max_steps=1", *sgd,
                   "algorithm.rl_optimizer._target_=torch.optim.SGD", "algorithm.rl_optimizer.weight_decay=0")
    for a, b in zip(joint.policy.parameters(), base.policy.parameters()):
        moved = max(moved, (a - b).abs().max().item())
    assert moved > 1e-4  # the SFT term did change the update
