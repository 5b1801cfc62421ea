"""scripts/gpu_smoke.py --cpu: the stages the first GPU run executes, run here on CPU, so that the
script itself cannot fail on the GPU machine for a reason CPU could have shown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_every_stage_passes_on_cpu(tmp_path):
    proc = subprocess.run(
        ["timeout", "-k", "10", "900", sys.executable, "scripts/gpu_smoke.py", "--cpu", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "gpu_smoke.jsonl").read_text().splitlines()]
    failed = {r["stage"]: r.get("error") or r.get("tail") for r in records if not r["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-2000:])
    by_stage = {r["stage"]: r for r in records}
    assert list(by_stage) == ["sdpa_backward", "bf16_true", "bf16_mixed", "fsdp2", "hf_loop"]
    assert by_stage["bf16_mixed"]["moved_fraction"] >= 0.99
    assert by_stage["fsdp2"]["world_size"] == 2 and by_stage["fsdp2"]["sft_steps"] >= 1
    assert by_stage["hf_loop"]["ended_early"] >= 1  # the stop check met rows that ended early
