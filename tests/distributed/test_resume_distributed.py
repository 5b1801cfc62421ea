"""Exact resume with 2 ranks (gloo): DDP and FSDP2 runs stopped and resumed end where a straight
run ends, with the same logged metrics, and saving a checkpoint changes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_multiprocess import assert_same_params, run_worker  # noqa: E402

from toy_overrides import QUICK_TOY  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NO_EVAL = ["callbacks.evaluation.before_training=false", "callbacks.evaluation.after_training=false"]
# Some groups right, some all wrong (the quick toy base solves nothing): ranks differ in hardness.
STUB_REWARD = "reward._target_=stub_rewards.HashReward"


def test_random_buffer_resumes_every_ranks_own_draws(tmp_path):
    # algorithm=relift_random_buffer: each rank draws its buffer rows from its own generator (as
    # many as its hardest rows), so each rank must resume its own stream, not rank 0's.
    run = [*QUICK_TOY, *NO_EVAL, STUB_REWARD, "trainer=ddp", "algorithm=relift_random_buffer",
           "algorithm.buffer_threshold=2", "callbacks.checkpoint.every_n_train_steps=1"]
    straight = run_worker(tmp_path / "straight", [*run, "max_steps=4"])
    half = run_worker(tmp_path / "half", [*run, "max_steps=2"])
    checkpoint = tmp_path / "half" / "checkpoints" / "last.ckpt"
    resumed = run_worker(tmp_path / "resumed", [*run, "max_steps=4", f"ckpt_path={checkpoint}"])
    assert half[0]["mining"] != half[1]["mining"]  # the ranks' streams differ at the checkpoint
    assert straight[0]["sft_step"] >= 2
    for ours, theirs in zip(resumed, straight, strict=True):
        assert ours["buffer"] == theirs["buffer"]
        assert (ours["sft_step"], ours["mining"]) == (theirs["sft_step"], theirs["mining"])
        assert_same_params(ours["state"], theirs["state"])
