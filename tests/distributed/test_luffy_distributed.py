"""``algorithm=luffy`` on 2 CPU ranks (gloo), DDP and FSDP2: each rank mixes its own prompts'
demonstrations; ranks stay in step and agree on parameters, counters and logged values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_multiprocess import assert_same_params, run_worker  # noqa: E402

from toy_overrides import QUICK_TOY  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LUFFY = [
    *QUICK_TOY,
    "algorithm=luffy",
    "max_steps=2",
    # Levels 1-2 with demonstrations of at most 16 tokens: some prompts keep one, some have none,
    # so ranks can hold different numbers of off-policy rows (the collectives must still match).
    "data.train_rows.levels=[1,2]",
    "data.max_demo_length=16",
    "callbacks.evaluation.before_training=false",
    "callbacks.evaluation.after_training=false",
    "algorithm.micro_batch_size=3",
]


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_two_ranks_run_luffy_and_agree(tmp_path, trainer):
    ranks = run_worker(tmp_path, [*LUFFY, f"trainer={trainer}"])
    assert len(ranks) == 2 and ranks[0]["world_size"] == 2
    for rank in ranks:
        assert (rank["rl_step"], rank["sft_step"], rank["weights_version"]) == (2, 0, 2)
        assert rank["buffer"]["rows"] == []
    assert_same_params(ranks[0]["state"], ranks[1]["state"])
    # Reduced over both ranks: the same values on each (demos used gathered from both).
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    metrics = ranks[0]["metrics"]
    assert metrics["train/demos_used_frac"] > 0
    assert 0 <= metrics["luffy/demos_mixed"] <= 4  # the global batch's prompts, summed over ranks
    for key in ("luffy/off_policy_token_frac", "luffy/off_policy_prob", "luffy/shaped_prob"):
        assert key in metrics
