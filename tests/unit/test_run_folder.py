"""One run folder for every rank (relift_pl/run_folder.py): the folder rank 0 stamps reaches the
others through the launcher's store, srun's tasks take the job's folder, per-rank log names, a
rank that cannot write the folder lives on to the check, and the start-up check's verdicts."""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta

import pytest
from omegaconf import OmegaConf
from torch.distributed import TCPStore

from relift_pl import run_folder
from relift_pl.checkpoint import TrainingStepCheckpoint, named_abspath
from relift_pl.run_folder import (
    RankView,
    RunFolderCheck,
    RunFolderError,
    RunFolderProbe,
    agreed_run_dir,
    describe_problem,
    gather_views,
    launch_rank,
    register_resolvers,
    resolve_resume,
    run_folder_in_use,
    slurm_run_dir,
)

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "TORCHELASTIC_USE_AGENT_STORE",
                "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_JOB_NAME")  # fmt: skip


@pytest.fixture
def launcher(monkeypatch):
    """A clean launcher environment; returns a setter for this process's rank and world."""
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(run_folder, "_agreed", None)
    monkeypatch.setattr(run_folder, "_unwritable", None)

    def as_rank(rank: int, world: int = 2, **env: str) -> None:
        monkeypatch.setattr(run_folder, "_agreed", None)  # each call is a fresh process
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return as_rank


@pytest.fixture
def agent_store(launcher):
    """A TCPStore as torchrun's agent hosts it, and the env its workers get."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=30))  # fmt: skip
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    return store, env


def test_every_rank_gets_the_folder_rank_0_stamped(launcher, agent_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, env = agent_store
    launcher(0, **env)
    chosen = agreed_run_dir("outputs/2025-01-01/12-00-00")
    assert chosen == str(tmp_path / "outputs/2025-01-01/12-00-00")  # absolute: cwds may differ
    launcher(1, **env)  # started a second later: its own stamp differs
    assert agreed_run_dir("outputs/2025-01-01/12-00-01") == chosen
    launcher(0, **env)  # a restarted worker group (torchrun --max-restarts) keeps the folder
    assert agreed_run_dir("outputs/2025-01-01/12-05-00") == chosen


def test_without_torchruns_store_the_stamp_is_kept(launcher):
    assert agreed_run_dir("outputs/a/b") == "outputs/a/b"  # one process
    launcher(1, world=2)  # Lightning's own launcher: no agent store (it passes its folder on)
    assert agreed_run_dir("outputs/a/b") == "outputs/a/b"


def test_launch_rank_from_torchrun_or_srun(launcher, monkeypatch):
    assert launch_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert launch_rank() == 0  # a one-task step (sbatch's own shell): not a rank
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert launch_rank() == 3
    launcher(5)
    assert launch_rank() == 5  # torchrun (also inside an srun step)


def test_rank_zero_writes_hydra_files_others_their_own_log(launcher):
    register_resolvers()
    cfg = OmegaConf.create({"subdir": "${relift_on_rank_zero:.hydra}", "log": "train${relift_rank_log_suffix:}.log"})
    assert (cfg.subdir, cfg.log) == (".hydra", "train.log")
    launcher(3, world=4)
    cfg = OmegaConf.create({"subdir": "${relift_on_rank_zero:.hydra}", "log": "train${relift_rank_log_suffix:}.log"})
    assert (cfg.subdir, cfg.log) == (None, "train_rank3.log")


def _view(rank, folder="/runs/a", sees_rank0=True, unseen=(), problem=None, host=None):
    return RankView(rank, host or f"node{rank}", folder, sees_rank0, unseen, problem)


def test_a_shared_folder_passes():
    assert describe_problem([_view(0), _view(1), _view(2)]) is None


def test_one_folder_named_by_different_paths_passes_when_every_marker_is_seen():
    # Nodes reaching the shared folder through different symlinks or mount points.
    assert describe_problem([_view(0, folder="/nfs/a/run"), _view(1, folder="/mnt/a/run")]) is None


def test_ranks_in_different_folders_are_named_when_they_miss_the_markers():
    problem = describe_problem([_view(0, unseen=(1,)), _view(1, folder="/runs/b", sees_rank0=False)])
    assert problem == (
        "the ranks write into different run folders and do not see each other's files: rank 0 "
        "(node0) into /runs/a, rank 1 (node1) into /runs/b; give every rank the same "
        "hydra.run.dir, on a filesystem every node shares"
    )


def test_a_node_local_folder_is_named_with_the_ranks_that_do_not_see_it():
    # Node 1 (ranks 2, 3) has its own disk: rank 0 misses their markers, they miss rank 0's.
    views = [_view(0, unseen=(2, 3)), _view(1), _view(2, sees_rank0=False), _view(3, sees_rank0=False)]
    problem = describe_problem(views)
    assert problem.startswith(
        "the run folder /runs/a is not shared by every node: rank 0 (node0) and ranks 2 (node2), "
        "3 (node3) do not see each other's files in it"
    )
    assert "hydra.run.dir=<shared path>" in problem


def test_a_resume_some_ranks_cannot_find_names_them():
    missing = "ckpt_path=last but /runs/a/checkpoints holds no preempted.ckpt or last.ckpt; ..."
    assert describe_problem([_view(0), _view(1, problem=missing)]) == f"rank 1 (node1) cannot resume: {missing}"
    assert describe_problem([_view(0, problem=missing), _view(1, problem=missing)]) == missing


def test_one_process_checks_its_own_markers_and_leaves_none(tmp_path):
    (view,) = gather_views(tmp_path, None, barrier=lambda name: None)
    assert (view.rank, view.folder, view.sees_rank0, view.unseen) == (0, str(tmp_path), True, ())
    assert list(tmp_path.iterdir()) == []


def test_a_resume_lookup_fails_at_once_alone_and_at_the_check_with_several_ranks(launcher, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path=last"):
        resolve_resume("last", str(tmp_path))
    launcher(1, world=2)
    ckpt, problem = resolve_resume("last", str(tmp_path))
    assert ckpt is None and "holds no preempted.ckpt or last.ckpt" in problem
    with pytest.raises(RunFolderError, match="holds no preempted.ckpt or last.ckpt"):
        RunFolderCheck(str(tmp_path), problem).setup(trainer=None, pl_module=None, stage="fit")
    assert resolve_resume(None, str(tmp_path)) == (None, None)


def test_a_rank_that_cannot_write_its_marker_is_named():
    views = [_view(0), _view(1, sees_rank0=False)]
    views[1] = RankView(1, "node1", "/runs/a", False, (), None, "PermissionError: [Errno 13] denied")
    assert describe_problem(views) == (
        "rank 1 (node1) cannot write into the run folder /runs/a (PermissionError: [Errno 13] "
        "denied); every rank writes there: give a hydra.run.dir that every node mounts "
        "read-write at the same path"
    )


def test_a_marker_that_cannot_be_written_is_reported_not_raised(tmp_path):
    (view,) = gather_views(tmp_path / "absent", None, barrier=lambda name: None)
    assert view.write_error.startswith("FileNotFoundError") and not view.sees_rank0


def test_srun_tasks_take_the_jobs_folder_whatever_their_stamps(launcher, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PWD", raising=False)
    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NAME": "relift"}.items():
        monkeypatch.setenv(name, value)
    assert agreed_run_dir("outputs/2025-01-01/12-00-00") == str(tmp_path / "outputs/slurm-4242")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    monkeypatch.setenv("SLURM_PROCID", "9")  # a later task, a later stamp: the same folder
    assert agreed_run_dir("outputs/2025-01-01/12-00-07") == str(tmp_path / "outputs/slurm-4242-3")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning does not lay ranks out from SLURM
    assert slurm_run_dir() is None
    monkeypatch.setenv("SLURM_JOB_NAME", "relift")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task (a one-task step, the batch shell)
    assert agreed_run_dir("outputs/a/b") == "outputs/a/b"


def test_absolute_paths_keep_the_symlinks_the_shell_named(monkeypatch, tmp_path):
    real = tmp_path / "disk_a"
    real.mkdir()
    (tmp_path / "view").symlink_to(real)
    monkeypatch.chdir(tmp_path / "view")
    monkeypatch.setenv("PWD", str(tmp_path / "view"))
    assert named_abspath("outputs/x") == str(tmp_path / "view/outputs/x")  # not disk_a/outputs/x
    monkeypatch.setenv("PWD", str(tmp_path))  # a stale PWD (another folder) is not trusted
    assert named_abspath("outputs/x") == str(real / "outputs/x")
    checkpoint = TrainingStepCheckpoint(dirpath=str(tmp_path / "view" / "run" / "checkpoints"))
    assert checkpoint.dirpath == str(tmp_path / "view" / "run" / "checkpoints")  # Lightning resolves


def _hydra_cfg(run_dir: str):
    return OmegaConf.create({"hydra": {"run": {"dir": run_dir}}, "x": 1})


def test_the_probe_fixes_a_writable_run_folder(launcher, tmp_path):
    register_resolvers()
    cfg = _hydra_cfg(str(tmp_path / "run"))
    RunFolderProbe().on_run_start(config=cfg)
    assert cfg.hydra.run.dir == str(tmp_path / "run") and (tmp_path / "run").is_dir()
    assert list((tmp_path / "run").iterdir()) == []  # its probe file is gone
    assert run_folder_in_use(str(tmp_path / "run")) == (str(tmp_path / "run"), None)


def test_a_rank_that_cannot_write_its_run_folder_runs_in_a_temporary_one(launcher, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "not_a_folder").write_text("")  # cannot be created: a file is in the way
    wanted = str(tmp_path / "not_a_folder" / "run")
    cfg = _hydra_cfg(wanted)
    RunFolderProbe().on_run_start(config=cfg)
    assert cfg.hydra.run.dir != wanted and os.access(cfg.hydra.run.dir, os.W_OK)
    folder, error = run_folder_in_use(cfg.hydra.run.dir)
    assert folder == wanted and error.startswith("NotADirectoryError")
    with pytest.raises(RunFolderError, match=f"rank 0 .* cannot write into the run folder {wanted} "):
        RunFolderCheck(folder, None, error).setup(trainer=None, pl_module=None, stage="fit")
    (view,) = gather_views(tmp_path / "not_a_folder" / "run", None, barrier=lambda name: None, write_error=error)
    assert view.write_error == error  # the probe's reason, not the marker's


def test_a_sharded_checkpoint_folder_needs_an_fsdp2_trainer(launcher, tmp_path):
    # Lightning's single-process load of a folder fails after the model loads with a 16-frame
    # IsADirectoryError; named here first, and under a multi-rank launch at the check.
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"last.ckpt is a sharded \(FSDP2\) checkpoint folder, .*trainer=fsdp"):
        resolve_resume(str(folder), str(tmp_path), sharded=False)
    with pytest.raises(ValueError, match="is incomplete or corrupted"):  # FSDP2: checked as a folder
        resolve_resume(str(folder), str(tmp_path), sharded=True)
    launcher(1, world=2)
    ckpt, problem = resolve_resume(str(folder), str(tmp_path), sharded=False)
    assert ckpt is None and "trainer=fsdp" in problem


def test_the_trainer_configs_that_shard_checkpoints(make_cfg):
    from relift_pl.strategies import shards_checkpoints

    sharded = {name: shards_checkpoints(make_cfg(f"trainer={name}").trainer)
               for name in ("default", "ddp", "gpu", "fsdp", "fsdp_8gpu", "multinode")}
    assert sharded == {"default": False, "ddp": False, "gpu": False, "fsdp": True, "fsdp_8gpu": True,
                       "multinode": True}
