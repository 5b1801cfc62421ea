"""The SLURM recipe, scripts/slurm/relift.sbatch, run as written on one CPU machine: a stand-in
srun (tests/distributed/slurm_standin/srun) starts its 2 tasks as 2 nodes x 1 process, which
Lightning's SLURMEnvironment lays out (gloo). It trains into the one run folder it names, and
the same job run again (a requeue: same job id) resumes there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from relift_pl.checkpoint import check_checkpoint_file  # noqa: E402
from toy_overrides import QUIET_TOY  # noqa: E402
from two_nodes import ON_CPU, ROOT, free_port  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SBATCH = ROOT / "scripts" / "slurm" / "relift.sbatch"
STANDIN = Path(__file__).with_name("slurm_standin")
RUN = [*QUIET_TOY, *ON_CPU, "callbacks.checkpoint.every_n_train_steps=2"]  # the recipe sets the layout
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RUN_DIR")


def _submit(run_dir: Path, overrides: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``sbatch --nodes=2 --ntasks-per-node=1`` as the batch shell would see it (job 4242)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"  # the recipe's `python`: this test's interpreter
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    env |= {
        "PATH": f"{STANDIN}:{bin_dir}:{env['PATH']}",
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "relift", "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "1",
        # On a cluster Lightning takes them from the node list and the job id.
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    return subprocess.run(
        ["timeout", "-k", "10", "400", "bash", str(SBATCH), *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip


def test_the_sbatch_recipe_trains_then_a_requeue_resumes(tmp_path):
    run_dir = tmp_path / "run"
    first = _submit(run_dir, [*RUN, "max_steps=2"], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    assert (run_dir / ".hydra").is_dir() and (run_dir / "train.log").is_file()
    assert (run_dir / "train_rank1.log").is_file()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert check_checkpoint_file(last) == last  # sharded, with both ranks' shards
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2

    requeued = _submit(run_dir, [*RUN, "max_steps=3"], tmp_path)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] and summary["steps"] == 3
