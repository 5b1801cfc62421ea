"""vLLM rollouts on 2 nodes x 1 process (two torchrun launches, gloo, CPU): one colocated engine
per rank joined to the training process group, seeded by its global rank, although both ranks
are local rank 0 as on two hosts."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / "integration"), str(TESTS / "distributed")]
from toy_overrides import QUIET_TOY  # noqa: E402
from two_nodes import TWO_NODES, launch_two_nodes  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

RUN = [
    *QUIET_TOY,
    "experiment=toy_vllm",
    *TWO_NODES,
    "data.train_rows.levels=[4]",  # every prompt hardest: an SFT step runs between rollouts
    "max_steps=2",
]


def test_each_node_runs_its_own_engine_seeded_by_global_rank(tmp_path):
    # vLLM prints its engine config at start-up, at INFO (the project quiets it to WARNING).
    launch = launch_two_nodes(tmp_path, RUN, timeout_s=500, env={"VLLM_LOGGING_LEVEL": "INFO"})
    assert [n.returncode for n in launch.nodes] == [0, 0], launch.report()
    for rank, node in enumerate(launch.nodes):
        (started,) = [line for line in (node.stdout + node.stderr).splitlines()
                      if "Initializing a V1 LLM engine" in line]
        assert f", seed={rank}," in started
    (metrics,) = tmp_path.glob("outputs/*/*/csv/metrics.csv")
    with open(metrics) as handle:
        diffs = [float(r["rollout/logprob_diff_max"]) for r in csv.DictReader(handle) if r.get("rollout/logprob_diff_max")]
    # Both steps sampled from engines synced with the trained weights (max over both ranks).
    assert len(diffs) == 2 and max(diffs) < 1e-3, diffs
