"""benchmarks/trl_compare.py quotes a ratio to TRL with its spread over rounds and the split
(generation, update): the ratio of medians alone hid a 1.16-1.78x spread."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from trl_compare import summarise  # noqa: E402


def run(completions_per_s: float, generate: float, forward: float, backward: float) -> dict:
    figures = {"sec_per_step_median": 64 / completions_per_s, "completions_per_s": completions_per_s,
               "gen_tokens_per_s": 64 * completions_per_s, "peak_rss_mb": 1000.0,
               "generate_s_per_step": generate, "loss_forward_s_per_step": forward,
               "backward_optim_other_s_per_step": backward, "mean_completion_length": 64.0,
               "uptime_before": "load average: 1.00, 1.00, 1.00"}  # fmt: skip
    return figures


def test_the_ratio_comes_with_its_spread_over_rounds_and_the_split():
    trl = [run(80, 1.0, 0.3, 0.6), run(100, 1.0, 0.3, 0.6), run(90, 1.2, 0.4, 0.8)]
    ours = [run(120, 0.5, 0.3, 0.3), run(110, 0.5, 0.2, 0.4), None]  # round 3 failed
    table, summary = summarise({"trl": trl, "relift-pl grpo-hf": ours}, "trl")
    mine = summary["relift-pl grpo-hf"]
    assert mine["completions_per_s_ratio_vs_trl"] == pytest.approx(115 / 90)  # medians
    assert mine["completions_per_s_ratio_per_round"] == pytest.approx([1.5, 1.1])  # rounds 1, 2
    assert mine["generation_speedup_vs_trl"] == pytest.approx(2.0)  # 1.0 s vs 0.5 s
    assert mine["update_speedup_vs_trl"] == pytest.approx(1.5)  # 0.9 s vs 0.6 s
    header, _, row = table.splitlines()[0], None, table.splitlines()[-1]
    assert "| completions/s vs TRL | per round | generation vs TRL | update vs TRL |" in header
    assert row.endswith("| 1.28x | 1.10-1.50x | 2.00x | 1.50x | 1.00x |"), row
