"""The fused log-prob head under FSDP2 on 2 gloo CPU ranks (see fused_head_fsdp_worker.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fused_head_fsdp_worker.py")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_fused_head_under_fsdp2(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        ["timeout", "-k", "10", "300", sys.executable, str(WORKER), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rank in range(2):
        result = json.loads(Path(f"{out}.rank{rank}").read_text())
        # fp32: the sharded fused head = the unsharded full-logits path (values, averaged grads).
        assert result["fp32_value_diff"] <= 1e-6
        assert result["fp32_grad_diff"] <= 1e-6
        assert result["head_restored"]
        # bf16 parameters: the same logits, gradients within one bf16 step of the largest entry
        # (the head's weight gradient is rounded per token chunk, not once).
        assert result["bf16_value_diff"] <= 1e-6
        assert result["bf16_grad_diff"] <= 2**-7 * result["bf16_grad_scale"]
