"""The SLURM recipe, scripts/slurm/relift.sbatch, run as written on one CPU machine: a stand-in
srun (tests/distributed/slurm_standin/srun, which counts tasks as srun does inside a job) starts
its tasks as 2 nodes x 1 process, laid out by Lightning's SLURMEnvironment or by torchrun
(gloo). It trains into the one run folder it names, the same job run again (a requeue: same
job id) resumes there, and a job whose run was preempted requeues itself (a stand-in scontrol
records it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from conftest import compose_cfg  # noqa: E402
from relift_pl.checkpoint import check_checkpoint_file  # noqa: E402
from relift_pl.models import resolve_model_path  # noqa: E402
from toy_overrides import QUIET_TOY  # noqa: E402
from two_nodes import ON_CPU, ROOT, free_port, slurm_job_env  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SBATCH = ROOT / "scripts" / "slurm" / "relift.sbatch"
STANDIN = Path(__file__).with_name("slurm_standin")
RUN = [*QUIET_TOY, *ON_CPU, "callbacks.checkpoint.every_n_train_steps=2"]  # the recipe sets the layout


def _submit(run_dir: Path, overrides: list[str], tmp_path: Path, timeout_s: int = 400,
            stubs: Path | None = None, **env: str) -> subprocess.CompletedProcess:  # fmt: skip
    """``sbatch --nodes=2 --ntasks-per-node=1`` as the batch shell would see it (job 4242);
    ``env`` on top (another allocation, LAUNCHER), ``stubs`` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"  # the recipe's `python`: this test's interpreter
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    job = slurm_job_env(
        # On a cluster Lightning takes them from the node list and the job id.
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RDZV_PORT=str(free_port()),
        SLURM_SUBMIT_DIR=str(ROOT), RUN_DIR=str(run_dir), SCONTROL_LOG=str(tmp_path / "scontrol.log"),
    )  # fmt: skip
    path = [str(p) for p in (stubs, STANDIN, bin_dir) if p is not None]
    return subprocess.run(
        ["timeout", "-k", "10", str(timeout_s), "bash", str(SBATCH), *overrides],
        cwd=tmp_path, env=job | {"PATH": ":".join([*path, job["PATH"]])} | env, capture_output=True, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def toy_base():
    """The toy base, built once here (not by both ranks at once)."""
    cfg = compose_cfg(RUN)
    resolve_model_path(cfg.model.name_or_path, instantiate(cfg.model.build))


def _output(done: subprocess.CompletedProcess) -> str:
    return done.stdout[-3000:] + done.stderr[-6000:]


def _requeued(tmp_path: Path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def test_the_sbatch_recipe_trains_then_a_requeue_resumes(tmp_path, toy_base):
    run_dir = tmp_path / "run"
    first = _submit(run_dir, [*RUN, "max_steps=2"], tmp_path)
    assert first.returncode == 0, _output(first)
    assert (run_dir / ".hydra").is_dir() and (run_dir / "train.log").is_file()
    assert (run_dir / "train_rank1.log").is_file()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert check_checkpoint_file(last) == last  # sharded, with both ranks' shards
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert _requeued(tmp_path) == []  # finished: not requeued

    requeued = _submit(run_dir, [*RUN, "max_steps=3"], tmp_path)
    assert requeued.returncode == 0, _output(requeued)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] and summary["steps"] == 3


def test_the_torchrun_variant_starts_one_launcher_per_node(tmp_path, toy_base):
    """LAUNCHER=torchrun in an allocation of 2 nodes x 2 tasks (SLURM_NTASKS=4, which srun
    reads as --ntasks): one torchrun per node all the same, each starting its worker; the
    header's former `srun --ntasks-per-node=1` started 4 launchers for 2 nodes."""
    run_dir = tmp_path / "run"
    done = _submit(run_dir, [*RUN, "max_steps=2"], tmp_path, timeout_s=300, LAUNCHER="torchrun",
                   GPUS_PER_NODE="1", SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2")  # fmt: skip
    assert done.returncode == 0, _output(done)
    assert "srun stand-in: 2 tasks, 1 per node" in done.stderr and "can't honor" not in done.stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


def _fake_srun(stubs: Path, body: str) -> None:
    """An srun whose "run" is ``body`` (a shell snippet; $RUN_DIR is the run folder)."""
    stubs.mkdir(exist_ok=True)
    srun = stubs / "srun"
    srun.write_text(f'#!/bin/bash\nset -eu\necho "srun $*" >>"$(dirname "$RUN_DIR")/srun.log"\n{body}\n')
    srun.chmod(0o755)


PREEMPTED_RUN = 'mkdir -p "$RUN_DIR/checkpoints/preempted.ckpt.tmp" && mv "$RUN_DIR/checkpoints/preempted.ckpt.tmp" "$RUN_DIR/checkpoints/preempted.ckpt"'  # noqa: E501


def test_a_preempted_job_requeues_itself(tmp_path):
    """The run exits 0 after writing preempted.ckpt (SIGTERM from --signal): the job requeues."""
    run_dir, stubs = tmp_path / "run", tmp_path / "stubs"
    _fake_srun(stubs, PREEMPTED_RUN)
    done = _submit(run_dir, ["max_steps=9"], tmp_path, stubs=stubs)
    assert done.returncode == 0, _output(done)
    assert _requeued(tmp_path) == ["requeue 4242"]
    assert "ckpt_path=null" in (tmp_path / "srun.log").read_text()


def test_a_requeued_job_that_finishes_is_not_requeued_again(tmp_path):
    """preempted.ckpt from the job's previous run stays; this run finishes (last.ckpt only)."""
    run_dir, stubs = tmp_path / "run", tmp_path / "stubs"
    (run_dir / "checkpoints" / "preempted.ckpt").mkdir(parents=True)
    _fake_srun(stubs, 'rm -rf "$RUN_DIR/checkpoints/last.ckpt" && mkdir "$RUN_DIR/checkpoints/last.ckpt"')
    done = _submit(run_dir, ["max_steps=9"], tmp_path, stubs=stubs)
    assert done.returncode == 0, _output(done)
    assert _requeued(tmp_path) == []
    assert "ckpt_path=last" in (tmp_path / "srun.log").read_text()


def test_a_failed_run_is_not_requeued(tmp_path):
    run_dir, stubs = tmp_path / "run", tmp_path / "stubs"
    _fake_srun(stubs, f"{PREEMPTED_RUN} && exit 3")
    done = _submit(run_dir, ["max_steps=9"], tmp_path, stubs=stubs)
    assert done.returncode == 3 and _requeued(tmp_path) == [], _output(done)


def test_a_preempted_job_that_may_not_requeue_says_how_to_resume(tmp_path):
    run_dir, stubs = tmp_path / "run", tmp_path / "stubs"
    _fake_srun(stubs, PREEMPTED_RUN)
    done = _submit(run_dir, ["max_steps=9", "data.batch_size=8"], tmp_path, stubs=stubs, SCONTROL_LOG="")
    assert done.returncode == 1, _output(done)
    assert done.stderr.splitlines()[-1] == (
        f"could not requeue job 4242; resume with: RUN_DIR={run_dir} sbatch "
        "scripts/slurm/relift.sbatch max_steps=9 data.batch_size=8"
    )
