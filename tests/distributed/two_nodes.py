"""Two "nodes" on one machine: two torchrun launches (``--nnodes 2 --nproc-per-node 1``, gloo)
of ``train.py``, as on two hosts, plus a node-local disk for one of them.

A node-local disk is simulated honestly: node 1 runs in its own mount namespace
(``unshare --mount --map-root-user``) where a private folder is bound over the path the nodes
should share, so node 1 sees the same path names as node 0 but other contents, as on two hosts
with local disks. The same namespace gives node 1 a read-only mount, or another mount point
for the shared folder.

Plain ``srun`` tasks (no torchrun) are two processes with the variables srun gives its tasks,
which Lightning's SLURMEnvironment reads.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "train.py"
START_LATE = Path(__file__).with_name("start_late.py")
# trainer=multinode is a GPU config (bf16-mixed): the same layout on CPU processes.
ON_CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true"]
TWO_NODES = ["trainer=multinode", "trainer.num_nodes=2", "trainer.devices=1", *ON_CPU]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def can_unshare() -> bool:
    """Whether this machine lets an unprivileged user bind a folder in a mount namespace."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as private, tempfile.TemporaryDirectory() as over:
        probe = subprocess.run([*private_mount(Path(private), Path(over)), "true"], capture_output=True)
    return probe.returncode == 0


def private_mount(private: Path, over: Path) -> list[str]:
    """A command prefix that runs the rest with ``private`` bound over ``over`` (and ``over`` as
    its working directory when the command starts there)."""
    return own_mounts(binds=[(private, over)])


def own_mounts(binds: list[tuple[Path, Path]] = (), read_only: list[Path] = ()) -> list[str]:
    """A command prefix that runs the rest in its own mount namespace: each ``(source, target)``
    of ``binds`` bound over its target, in order, then each of ``read_only`` remounted
    read-only (its working directory entered again, so it sees the new mounts)."""
    steps = [f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}" for src, dst in binds]
    for path in read_only:
        quoted = shlex.quote(str(path))
        steps += [f"mount --bind {quoted} {quoted}", f"mount -o remount,bind,ro {quoted}"]
    script = " && ".join([*steps, 'cd "$PWD"', 'exec "$@"'])
    return ["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh"]


@dataclass
class Node:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout[-4000:] + self.stderr[-6000:]


@dataclass
class Launch:
    nodes: list[Node]
    seconds: float

    def report(self) -> str:
        return "\n".join(f"--- node {i} (rc {n.returncode})\n{n.output}" for i, n in enumerate(self.nodes))


def launch_two_nodes(
    cwd: Path,
    overrides: list[str],
    timeout_s: int = 420,
    node1_prefix: list[str] | None = None,
    node1_waits_for: Path | None = None,
    env: dict[str, str] | None = None,
) -> Launch:
    """Runs ``train.py <overrides>`` as 2 nodes x 1 process, both started in ``cwd``.

    Args:
        node1_prefix: a command prefix for node 1's torchrun (a private mount).
        node1_waits_for: node 1's worker starts only once rank 0 has written its ``.hydra``
            folder under this ``outputs`` folder and the clock's second has moved on: a start-up
            skew between the ranks (their stamps differ), without a fixed sleep.
        env: variables added to both nodes' environment.
    """
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    procs = []
    started = time.monotonic()
    for node in (0, 1):
        command = [
            "timeout", "-k", "10", str(timeout_s),
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            *_train_script(node, node1_waits_for), *overrides,
        ]  # fmt: skip
        if node == 1 and node1_prefix:
            command = [*node1_prefix, *command]
        procs.append(_start(command, cwd, env))
    return _finish(procs, started)


def _train_script(node: int, node1_waits_for: Path | None) -> list[str]:
    if node == 1 and node1_waits_for is not None:
        return [str(START_LATE), str(node1_waits_for), str(TRAIN)]
    return [str(TRAIN)]


def _start(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen], started: float) -> Launch:
    outputs = [proc.communicate() for proc in procs]
    seconds = time.monotonic() - started
    return Launch([Node(p.returncode, *out) for p, out in zip(procs, outputs)], seconds)


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RUN_DIR")


def slurm_job_env(**variables: str) -> dict[str, str]:
    """This process's environment without launcher variables, plus job 4242's on 2 nodes x 1
    task (as sbatch gives its shell; the tasks' own variables are srun's) and ``variables``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    return env | {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "relift", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_NODELIST": "127.0.0.1",
        "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0",
    } | variables  # fmt: skip


def launch_srun_tasks(cwd: Path, overrides: list[str], timeout_s: int = 420,
                      node1_waits_for: Path | None = None) -> Launch:  # fmt: skip
    """Runs ``train.py <overrides>`` as the 2 tasks of srun step 0 of job 4242 (2 nodes x 1
    task; plain processes, laid out by Lightning's SLURMEnvironment), both started in ``cwd``;
    ``node1_waits_for`` as in :func:`launch_two_nodes`."""
    job = slurm_job_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), SLURM_STEP_ID="0")
    procs = []
    started = time.monotonic()
    for rank in (0, 1):
        env = job | {"SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank)}
        command = ["timeout", "-k", "10", str(timeout_s), sys.executable, *_train_script(rank, node1_waits_for)]
        procs.append(_start([*command, *overrides], cwd, env))
    return _finish(procs, started)
