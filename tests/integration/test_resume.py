"""Exact resume: N steps straight == N/2 steps, stop, resume, N/2 more (bitwise on CPU)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg
from relift_pl.train import fit
from toy_overrides import QUICK_TOY

RUN = [
    *QUICK_TOY,
    "logger=csv",
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.evaluation.before_training=false",
    "callbacks.evaluation.after_training=false",
    # Levels 3 and 4: some prompts hardest, some not, so the buffer keeps leftovers across steps.
    "data.train_rows.levels=[3,4]",
    "algorithm.buffer_threshold=3",
]


def _metrics(out: Path) -> dict[int, dict[str, str]]:
    with open(next(out.rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    by_step: dict[int, dict[str, str]] = {}
    for row in rows:
        if row.get("step"):
            merged = by_step.setdefault(int(float(row["step"])), {})
            merged.update({k: v for k, v in row.items() if v != ""})
    return by_step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    straight_dir = tmp_path_factory.mktemp("straight")
    straight = fit(compose_cfg([*RUN, "max_steps=4"], output_dir=straight_dir))
    half_dir = tmp_path_factory.mktemp("half")
    fit(compose_cfg([*RUN, "max_steps=2"], output_dir=half_dir))
    checkpoint = half_dir / "checkpoints" / "last.ckpt"
    resumed_dir = tmp_path_factory.mktemp("resumed")
    resumed = fit(compose_cfg([*RUN, "max_steps=4", f"ckpt_path={checkpoint}"], output_dir=resumed_dir))
    return straight, resumed, straight_dir, resumed_dir, checkpoint


def test_resumed_parameters_are_bitwise_equal(runs):
    straight, resumed, *_ = runs
    a = straight.module.policy.state_dict()
    b = resumed.module.policy.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resumed_counters_buffer_and_optimizers_match(runs):
    straight, resumed, *_ = runs
    s, r = straight.module, resumed.module
    assert (s.step_count, s.rl_step, s.sft_step) == (r.step_count, r.rl_step, r.sft_step)
    assert s.sft_step >= 1
    assert s.demos_used == r.demos_used
    assert s.buffer.state_dict() == r.buffer.state_dict()
    for opt_s, opt_r in zip(s.optimizers(), r.optimizers()):
        for state_s, state_r in zip(opt_s.optimizer.state.values(), opt_r.optimizer.state.values()):
            assert torch.equal(state_s["exp_avg"], state_r["exp_avg"])


def test_resumed_logged_metrics_match(runs):
    _, _, straight_dir, resumed_dir, _ = runs
    straight, resumed = _metrics(straight_dir), _metrics(resumed_dir)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("train/reward_mean", "rl/loss", "buffer/size", "train/sft_step"):
            assert resumed[step].get(key) == straight[step].get(key), (step, key)


def test_checkpoint_holds_everything(runs):
    *_, checkpoint = runs
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert len(state["optimizer_states"]) == 2  # RL and SFT AdamW
    relift = state["relift"]
    assert {"step_count", "rl_step", "sft_step", "buffer", "rng", "demos_used"} <= relift.keys()
    (rank0,) = relift["rng"]  # one state per rank
    assert {"python", "numpy", "torch"} <= rank0.keys()
    assert any("HardQuestionMining" in key for key in state["callbacks"])


def test_the_log_prob_check_patience_survives_a_checkpoint(tmp_path):
    # rollout.max_logprob_diff_mean stops a run after 3 RL steps in a row above it: a resume
    # between the second and the third must not start the count again.
    from relift_pl.train import build

    cfg = compose_cfg([*RUN, "max_steps=4"], output_dir=tmp_path)
    _, module, _ = build(cfg)
    module.mismatch_strikes = 2
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    _, resumed, _ = build(cfg)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.mismatch_strikes == 2
