"""Past one node: 2 nodes x 1 process on CPU (two torchrun launches, or two srun tasks, gloo)
through train.py trainer=multinode: one run folder, sharded checkpoints, a bitwise resume,
node-local disks and a read-only run folder stopped with one line on every rank, and a run
folder reached through different symlinks accepted."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from conftest import compose_cfg  # noqa: E402
from relift_pl.checkpoint import check_checkpoint_file  # noqa: E402
from relift_pl.models import resolve_model_path  # noqa: E402
from toy_overrides import QUIET_TOY  # noqa: E402
from two_nodes import (  # noqa: E402
    TWO_NODES,
    can_unshare,
    launch_srun_tasks,
    launch_two_nodes,
    own_mounts,
    private_mount,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RUN = [
    *QUIET_TOY,
    *TWO_NODES,
    "data.train_rows.levels=[3,4]",  # some prompts hardest: SFT steps run, the buffer carries rows
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.checkpoint.export_hf=true",
    "callbacks.checkpoint.export_dtype=float32",
]
needs_unshare = pytest.mark.skipif(not can_unshare(), reason="needs unprivileged mount namespaces (unshare -rm)")


def _run_folders(outputs: Path) -> list[Path]:
    return sorted(p for p in outputs.glob("*/*") if p.is_dir())


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error: ")]


@pytest.fixture(scope="module")
def toy_base():
    """The toy base, built once here (not by both ranks at once)."""
    cfg = compose_cfg(RUN)
    resolve_model_path(cfg.model.name_or_path, instantiate(cfg.model.build))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, toy_base):
    """4 steps on 2 nodes, checkpoints at 2 and 4; node 1's rank starts over a second late."""
    shared = tmp_path_factory.mktemp("shared")
    launch = launch_two_nodes(shared, [*RUN, "max_steps=4"], node1_waits_for=shared / "outputs")
    assert [n.returncode for n in launch.nodes] == [0, 0], launch.report()
    print(f"2-node run, 4 steps: {launch.seconds:.0f} s")
    return shared


def test_every_rank_writes_into_rank_zeros_run_folder(straight):
    (folder,) = _run_folders(straight / "outputs")  # one folder, whatever the start-up skew
    assert (folder / ".hydra" / "config.yaml").is_file()
    assert (folder / "train.log").is_file() and (folder / "train_rank1.log").is_file()
    assert not list(folder.glob(".shared-check*"))  # the start-up markers are cleaned up


def test_sharded_checkpoints_hold_every_ranks_shard(straight):
    (folder,) = _run_folders(straight / "outputs")
    checkpoints = folder / "checkpoints"
    for name in ("step-000002.ckpt", "step-000004.ckpt", "last.ckpt"):
        assert check_checkpoint_file(checkpoints / name) == checkpoints / name
        assert sorted(p.name for p in (checkpoints / name).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(checkpoints.glob("*.tmp")) and not list(checkpoints.glob("*.old"))
    assert (folder / "final_model" / "model.safetensors").is_file()


def test_resume_on_two_nodes_is_bitwise(straight, tmp_path):
    (folder,) = _run_folders(straight / "outputs")
    step2 = folder / "checkpoints" / "step-000002.ckpt"
    launch = launch_two_nodes(tmp_path, [*RUN, "max_steps=4", f"ckpt_path={step2}"])
    assert [n.returncode for n in launch.nodes] == [0, 0], launch.report()
    (resumed,) = _run_folders(tmp_path / "outputs")
    a = load_file(folder / "final_model" / "model.safetensors")
    b = load_file(resumed / "final_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@needs_unshare
def test_a_node_local_run_folder_stops_a_resume_on_every_rank(straight, tmp_path):
    """Node 1 sees its own disk at the run folder's path: it finds no checkpoint there, and
    neither rank sees the other's files. Every rank stops before training, with one line."""
    shared = tmp_path / "shared"
    shutil.copytree(straight, shared)
    (folder,) = _run_folders(shared / "outputs")
    private = tmp_path / "node1_disk"
    private.mkdir()
    launch = launch_two_nodes(
        shared, [*RUN, "max_steps=6", f"hydra.run.dir={folder}", "ckpt_path=last"],
        timeout_s=240, node1_prefix=private_mount(private, shared),
    )  # fmt: skip
    for node in launch.nodes:
        assert node.returncode == 1, launch.report()
        (line,) = _error_lines(node.stderr)
        assert f"the run folder {folder} is not shared by every node" in line, line
    assert not (folder / "checkpoints" / "step-000006.ckpt").exists()
    print(f"node-local resume stopped in {launch.seconds:.0f} s: {line}")


@needs_unshare
def test_a_node_local_checkpoint_folder_fails_the_save_on_every_rank(tmp_path, toy_base):
    """The run folder is shared but callbacks.checkpoint.dirpath is on node-local disks: the
    first sharded save lacks rank 1's shard on node 0, so it does not count and every rank
    stops with one line (before the check, the run exited 0 with incomplete checkpoints)."""
    shared, local, private = tmp_path / "shared", tmp_path / "local", tmp_path / "node1_local"
    for path in (shared, local, private):
        path.mkdir()
    overrides = [*RUN, "max_steps=2", "callbacks.checkpoint.every_n_train_steps=1",
                 f"callbacks.checkpoint.dirpath={local / 'checkpoints'}"]
    launch = launch_two_nodes(shared, overrides, timeout_s=240, node1_prefix=private_mount(private, local))
    for node in launch.nodes:
        assert node.returncode == 1, launch.report()
        (line,) = _error_lines(node.stderr)
        assert "lacks rank 1's shard" in line, line
    print(f"node-local checkpoint folder stopped in {launch.seconds:.0f} s: {line}")
    saved = local / "checkpoints"
    assert not (saved / "step-000001.ckpt").exists() and not (saved / "last.ckpt").exists()
    # The incomplete save's folder is gone, on node 0 and on node 1's own disk.
    assert not (saved / "step-000001.ckpt.tmp").exists()
    assert not (private / "checkpoints" / "step-000001.ckpt.tmp").exists()


def test_plain_srun_tasks_share_one_run_folder_whatever_the_skew(tmp_path, toy_base):
    """`srun python train.py ...` without hydra.run.dir: the two tasks (Lightning's
    SLURMEnvironment, no torchrun store) take outputs/slurm-<job id>-<step id>, though task 1
    starts after task 0 has written its .hydra folder and the clock's second has moved on."""
    launch = launch_srun_tasks(tmp_path, [*RUN, "max_steps=1"], timeout_s=300,
                               node1_waits_for=tmp_path / "outputs")  # fmt: skip
    assert [n.returncode for n in launch.nodes] == [0, 0], launch.report()
    folder = tmp_path / "outputs" / "slurm-4242-0"
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == [folder.name]
    assert (folder / ".hydra").is_dir() and (folder / "train.log").is_file() and (folder / "train_rank1.log").is_file()
    last = folder / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    print(f"2 srun tasks, 1 step: {launch.seconds:.0f} s")


@needs_unshare
def test_a_node_that_cannot_write_the_run_folder_stops_every_rank(tmp_path, toy_base):
    """Node 1 has the shared filesystem read-only: its rank cannot create or write the run
    folder. It used to die inside Hydra before any process group existed, leaving rank 0 waiting
    for it (30 minutes); now every rank stops with one line naming the folder and the rank."""
    shared = tmp_path / "shared"
    (shared / "runs").mkdir(parents=True)
    folder = shared / "runs" / "run"
    launch = launch_two_nodes(
        shared, [*RUN, "max_steps=2", f"hydra.run.dir={folder}"], timeout_s=240,
        node1_prefix=own_mounts(read_only=[shared / "runs"]),
    )  # fmt: skip
    for node in launch.nodes:
        assert node.returncode == 1, launch.report()  # not 124: the timeout's
        (line,) = _error_lines(node.stderr)
        assert line.startswith("Error: rank 1 (") and f"cannot write into the run folder {folder} (" in line, line
        assert "Read-only file system" in line, line
    assert not (folder / "checkpoints").exists()
    print(f"read-only run folder on node 1 stopped in {launch.seconds:.0f} s: {line}")


@needs_unshare
def test_nodes_reaching_the_run_folder_through_different_symlinks_train(tmp_path, toy_base):
    """Both nodes are given <links>/view/run. On node 0 view links to the filesystem's mount
    point disk_a; node 1 mounts the same filesystem at disk_b (its disk_a is a local, empty
    folder) and its view links there. Every marker is seen, so the run trains, and each rank
    writes its shard through its own view (not through rank 0's resolved path)."""
    disk_a, disk_b, empty = tmp_path / "disk_a", tmp_path / "disk_b", tmp_path / "node1_disk_a"
    links, links1 = tmp_path / "links", tmp_path / "node1_links"
    for path in (disk_a, disk_b, empty, links, links1):
        path.mkdir()
    (links / "view").symlink_to(disk_a)
    (links1 / "view").symlink_to(disk_b)
    folder = links / "view" / "run"
    node1 = own_mounts(binds=[(disk_a, disk_b), (empty, disk_a), (links1, links)])
    launch = launch_two_nodes(tmp_path, [*RUN, "max_steps=1", f"hydra.run.dir={folder}"], timeout_s=300,
                              node1_prefix=node1)  # fmt: skip
    assert [n.returncode for n in launch.nodes] == [0, 0], launch.report()
    last = disk_a / "run" / "checkpoints" / "last.ckpt"
    assert check_checkpoint_file(last) == last
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (disk_a / "run" / "train_rank1.log").is_file()
    assert list(empty.iterdir()) == []  # node 1 wrote nothing under rank 0's resolved path
    print(f"symlinked views, 1 step: {launch.seconds:.0f} s")
