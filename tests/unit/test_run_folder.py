"""One run folder for every rank (relift_pl/run_folder.py): the folder rank 0 stamps reaches the
others through the launcher's store; per-rank log names."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
from omegaconf import OmegaConf
from torch.distributed import TCPStore

from relift_pl import run_folder
from relift_pl.run_folder import agreed_run_dir, launch_rank, register_resolvers

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "TORCHELASTIC_USE_AGENT_STORE",
                "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


@pytest.fixture
def launcher(monkeypatch):
    """A clean launcher environment; returns a setter for this process's rank and world."""
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(run_folder, "_agreed", None)

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
