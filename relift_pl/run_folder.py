"""One run folder for every rank of a launch, and the start-up check that every node sees it.

Sharded checkpoints are written by every rank (each its own shard) and read back by every rank,
so all ranks must write into one folder on a filesystem all nodes share.

Choosing it happens in Hydra's ``hydra.run.dir`` (conf/train.yaml), before any process group:
- given on the command line (``hydra.run.dir=...``, as the SLURM recipe does): every rank has it;
- under torchrun: rank 0 stamps it (``outputs/<date>/<time>``, made absolute) and publishes it in
  the store torchrun's agent hosts at MASTER_ADDR:MASTER_PORT before any worker starts; the
  other ranks read it there, whatever their start-up skew (static and c10d rendezvous share it;
  with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 give hydra.run.dir). A restarted worker group
  (``--max-restarts``) finds the same folder;
- the tasks of a multi-task ``srun`` step (plain ``srun python train.py``, laid out by Lightning's
  SLURMEnvironment; no store before the process group): ``outputs/slurm-<job id>-<step id>``
  (made absolute), the same on every rank whatever the skew; a requeued job finds it again;
- otherwise Hydra's own stamp (one process; Lightning's own launcher passes its folder on).
Rank 0 writes ``.hydra/`` and ``train.log``; rank r > 0 writes its ``train_rank<r>.log`` beside.

Before Hydra creates the folder and opens the log in it, :class:`RunFolderProbe` (a Hydra
callback) tries to create and write it. A rank that cannot (a read-only mount, a shared
filesystem this node lacks) would otherwise die there, before any process group exists, and
leave the others waiting for it for the process group's timeout (30 minutes); instead it notes
why, runs in a temporary folder, and the check below stops every rank with one line.

Checking it (:class:`RunFolderCheck`, once the process group exists, before training): each rank
writes a marker into its run folder, rank 0 looks for all of them and every rank for rank 0's;
a folder some rank cannot write, a folder some rank does not see (a node-local disk; ranks in
different folders), or a resume checkpoint some rank could not find stop every rank with one
line. Only the markers decide: nodes that reach the folder through different paths (symlinks,
other mount points) pass when they see each other's markers.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from torch.distributed import TCPStore

from relift_pl.checkpoint import named_abspath, resolve_ckpt_path
from relift_pl.config import ConfigError
from relift_pl.distributed import all_gather_objects, world_size_and_rank

STORE_KEY = "relift/run_dir"
STORE_TIMEOUT = timedelta(minutes=10)  # rank 0 publishes seconds after the others start
_agreed: str | None = None
# (the run folder this rank was given, why it cannot write there): set by RunFolderProbe.
_unwritable: tuple[str, str] | None = None


class RunFolderError(ConfigError):
    """The ranks of a launch do not share their run or checkpoint folder (one line, every rank)."""


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun: RANK; srun with several
    tasks: SLURM_PROCID); 0 otherwise. Known before any process group exists."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    return 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def slurm_run_dir() -> str | None:
    """``outputs/slurm-<job id>[-<step id>]`` (absolute) for a task of a multi-task SLURM step
    that Lightning's SLURMEnvironment lays out (SLURM_NTASKS > 1, not an interactive job); None
    otherwise. The same on every rank, whatever the start-up skew, and again after a requeue."""
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    interactive = os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive")  # as Lightning's
    if not job or interactive or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return None
    return named_abspath(f"outputs/slurm-{job}" + (f"-{step}" if step else ""))


def agreed_run_dir(default: str) -> str:
    """``hydra.run.dir``: rank 0's ``default`` for every rank under torchrun, the step's
    :func:`slurm_run_dir` for srun's tasks, else ``default``."""
    global _agreed
    torchrun_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torchrun_store:
        return slurm_run_dir() or default
    if _agreed is None:
        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=STORE_TIMEOUT)  # fmt: skip
        if launch_rank() == 0:  # the first stamp stays (Hydra may resolve the key again)
            _agreed = store.compare_set(STORE_KEY, "", named_abspath(default)).decode()
        else:
            _agreed = store.get(STORE_KEY).decode()
    return _agreed


def write_problem(folder: str) -> str | None:
    """Why this process cannot create ``folder`` or write a file in it (None: it can)."""
    probe = Path(folder) / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


class RunFolderProbe(HydraCallback):
    """Hydra callback (``hydra.callbacks`` in conf/train.yaml), before Hydra creates the run
    folder: fixes ``hydra.run.dir`` to its value, made absolute as named (a stamp is taken
    once; nodes reaching the folder through different symlinks name it alike), and when this rank
    cannot write it, notes why and points Hydra at a temporary folder instead, so the rank lives
    until :class:`RunFolderCheck` stops every rank with one line (a rank that died in Hydra
    would leave the others waiting for the process group's timeout)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        global _unwritable
        folder = named_abspath(str(OmegaConf.select(config, "hydra.run.dir")))
        problem = write_problem(folder)
        if problem:
            _unwritable = (folder, problem)
            folder = tempfile.mkdtemp(prefix="relift-unwritable-run-dir-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the run stops at the check
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = folder


def run_folder_in_use(output_dir: str) -> tuple[str, str | None]:
    """(the run folder this rank was given, why it cannot write there or None): ``output_dir``
    unless :class:`RunFolderProbe` replaced it by a temporary folder."""
    return _unwritable if _unwritable else (output_dir, None)


def unwritable_line(rank: int, host: str, folder: str, error: str) -> str:
    return (
        f"rank {rank} ({host}) cannot write into the run folder {folder} ({error}); every rank "
        "writes there: give a hydra.run.dir that every node mounts read-write at the same path"
    )


def register_resolvers() -> None:
    """The resolvers conf/train.yaml's ``hydra:`` section uses."""
    resolvers = {
        "relift_run_dir": agreed_run_dir,
        "relift_rank_log_suffix": lambda: f"_rank{launch_rank()}" if launch_rank() else "",
        "relift_on_rank_zero": lambda value: value if launch_rank() == 0 else None,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def resolve_resume(
    ckpt_path: str | None, output_dir: str, sharded: bool | None = None
) -> tuple[str | None, str | None]:
    """(checkpoint, None) as :func:`resolve_ckpt_path` finds it, or, when several ranks were
    launched, (None, why not): a rank that stopped here alone would leave the others waiting for
    it in the process group's start-up (30 minutes); :class:`RunFolderCheck` stops them all.
    ``sharded``: whether the trainer is FSDP2 (only it loads a sharded checkpoint folder)."""
    try:
        return resolve_ckpt_path(ckpt_path, output_dir, sharded), None
    except (FileNotFoundError, ValueError) as err:
        if launched_world_size() <= 1:
            raise
        return None, str(err)


@dataclass(frozen=True)
class RankView:
    """What one rank reports to the check."""

    rank: int
    host: str
    folder: str
    sees_rank0: bool  # rank 0's marker is in this rank's folder
    unseen: tuple[int, ...]  # rank 0 only: ranks whose markers it cannot see
    resume_problem: str | None
    write_error: str | None = None  # this rank could not write its marker


def gather_views(
    folder: Path, resume_problem: str | None, barrier, write_error: str | None = None
) -> list[RankView]:
    """Every rank's view of the markers (a collective: every rank calls it, and no rank leaves
    it early on an error, which would leave the others waiting). ``write_error``: why this rank
    could not write the folder before (:class:`RunFolderProbe`)."""
    world, rank = world_size_and_rank()
    nonce = all_gather_objects([secrets.token_hex(6)])[0]  # rank 0's: no older marker counts
    marker, wrote = _marker(folder, nonce, rank), False
    try:
        marker.write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
        wrote = True
    except OSError as err:
        write_error = write_error or f"{type(err).__name__}: {err}"
    try:
        barrier("relift_run_folder_markers")
        unseen = tuple(r for r in range(world) if not _marker(folder, nonce, r).is_file()) if rank == 0 else ()
        view = RankView(rank, socket.gethostname(), str(folder), _marker(folder, nonce, 0).is_file(), unseen,
                        resume_problem, write_error)  # fmt: skip
        return all_gather_objects([view])  # every rank has looked once this returns
    finally:
        if wrote:
            marker.unlink(missing_ok=True)


def _marker(folder: Path, nonce: str, rank: int) -> Path:
    return folder / f".shared-check-{nonce}.rank{rank}"


def describe_problem(views: list[RankView]) -> str | None:
    """One line for what is wrong with the ranks' views (None: nothing). The markers decide:
    ranks that see each other's markers share the folder, whatever path each names it by."""
    zero = views[0]
    unwritable = next((v for v in views if v.write_error), None)
    if unwritable:
        return unwritable_line(unwritable.rank, unwritable.host, unwritable.folder, unwritable.write_error)
    blind = sorted({*zero.unseen, *(v.rank for v in views if not v.sees_rank0)})
    elsewhere = [views[r] for r in blind if views[r].folder != zero.folder]
    if elsewhere:
        return (
            f"the ranks write into different run folders and do not see each other's files: rank 0 "
            f"({zero.host}) into {zero.folder}, "
            + ", ".join(f"rank {v.rank} ({v.host}) into {v.folder}" for v in elsewhere[:3])
            + "; give every rank the same hydra.run.dir, on a filesystem every node shares"
        )
    if blind:
        return (
            f"the run folder {zero.folder} is not shared by every node: rank 0 ({zero.host}) and "
            f"{_ranks(views, blind)} do not see each other's files in it (a node-local disk?), so "
            "checkpoints would lack their shards; put it on a filesystem every node mounts "
            "(hydra.run.dir=<shared path>)"
        )
    failed = [v for v in views if v.resume_problem]
    if not failed:
        return None
    if len(failed) == len(views):
        return zero.resume_problem
    return f"{_ranks(views, [v.rank for v in failed])} cannot resume: {failed[0].resume_problem}"


def _ranks(views: list[RankView], ranks: list[int]) -> str:
    named = [f"{r} ({views[r].host})" for r in ranks[:4]]
    more = f" and {len(ranks) - 4} more" if len(ranks) > 4 else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(named)}{more}"


class RunFolderCheck(L.Callback):
    """At set-up (process group up; before the model is sharded, restored or trained): stops
    every rank with one line when the ranks do not share the run folder or some rank could not
    find the checkpoint to resume.

    Args:
        folder: the run folder (``paths.output_dir``; the one this rank was given when it could
            not write there: :func:`run_folder_in_use`). Named as given (absolute), not resolved.
        resume_problem: why this rank found no checkpoint to resume (:func:`resolve_resume`).
        write_error: why this rank could not write the folder (:class:`RunFolderProbe`).
    """

    def __init__(self, folder: str, resume_problem: str | None = None, write_error: str | None = None) -> None:
        self.folder = Path(named_abspath(folder))
        self.resume_problem = resume_problem
        self.write_error = write_error

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if world_size_and_rank()[0] == 1:
            problem = self.resume_problem
            if self.write_error:
                problem = unwritable_line(0, socket.gethostname(), str(self.folder), self.write_error)
        else:
            views = gather_views(self.folder, self.resume_problem, trainer.strategy.barrier, self.write_error)
            problem = describe_problem(views)
        if problem:
            raise RunFolderError(problem)
