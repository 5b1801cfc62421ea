"""AtomicCheckpointIO: a writer killed mid-write leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from relift_pl.checkpoint import AtomicCheckpointIO, check_checkpoint_file

ROOT = Path(__file__).resolve().parents[2]

# Writes a ~160 MB checkpoint (40 tensors of 4 MB) through AtomicCheckpointIO.save_checkpoint.
# Each write call of the file handle is followed by a short pause, as on a slow network
# filesystem, so the whole write takes seconds and the kill surely lands in the middle of it.
WRITER = """
import builtins, sys, time
import torch
import relift_pl.checkpoint as ck

class SlowFile:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        written = self.f.write(data)
        time.sleep(0.05)
        return written
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

real_open = builtins.open
ck.open = lambda *args, **kwargs: SlowFile(real_open(*args, **kwargs))
checkpoint = {"tag": "new", "state_dict": {f"w{i}": torch.full((1_000_000,), float(i)) for i in range(40)}}
print("writing", flush=True)
ck.AtomicCheckpointIO().save_checkpoint(checkpoint, sys.argv[1])
print("done", flush=True)
"""

FULL_SIZE = 40 * 4_000_000


def test_writer_killed_mid_write_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(
        {"tag": "old", "state_dict": {"w": torch.arange(1000, dtype=torch.float32)}}, path
    )
    before = path.read_bytes()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    tmp = path.with_name(f"{path.name}.tmp{writer.pid}")
    try:
        deadline = time.monotonic() + 120
        # Kill once a few tensors (8 MB) are on disk, far from the end (160 MB).
        while not (tmp.exists() and tmp.stat().st_size >= 8_000_000):
            if writer.poll() is not None:
                pytest.fail(f"writer exited early: {writer.communicate()}")
            if time.monotonic() > deadline:
                pytest.fail("writer never started writing")
            time.sleep(0.002)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    stdout = writer.stdout.read().decode()
    assert writer.returncode == -signal.SIGKILL
    assert "done" not in stdout

    # The partial write lies under the temporary name only; the real name is untouched.
    assert 0 < tmp.stat().st_size < FULL_SIZE
    assert path.read_bytes() == before
    check_checkpoint_file(path)  # passes the CRC check
    loaded = io.load_checkpoint(path)
    assert loaded["tag"] == "old"
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(1000, dtype=torch.float32))
    # The truncated temporary is not a loadable checkpoint, and it would be rejected clearly.
    with pytest.raises(ValueError, match=f"checkpoint {tmp} is truncated or corrupted"):
        check_checkpoint_file(tmp)

    # The next successful save replaces the checkpoint and removes the dead writer's leftover.
    io.save_checkpoint({"tag": "newer"}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert io.load_checkpoint(path)["tag"] == "newer"


def test_save_replaces_in_one_step_and_keeps_a_live_writers_temp(tmp_path):
    path = tmp_path / "last.ckpt"
    live = path.with_name(f"{path.name}.tmp{os.getppid()}")  # a running process's write in progress
    live.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"tag": "a"}, path)
    assert live.exists()  # never removed while its writer is alive
    assert AtomicCheckpointIO().load_checkpoint(path)["tag"] == "a"


def test_an_incomplete_sharded_checkpoint_folder_is_rejected(tmp_path):
    from relift_pl.checkpoint import check_checkpoint_file

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(b"shard without metadata")  # killed before .metadata
    with pytest.raises(ValueError, match=r"checkpoint folder .*last\.ckpt is incomplete"):
        check_checkpoint_file(folder)


def test_replace_dir_swaps_whole_folders(tmp_path):
    from relift_pl.export import replace_dir

    target, new = tmp_path / "model", tmp_path / "model.tmp1"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_ckpt_path_last_falls_back_past_a_damaged_newer_checkpoint(tmp_path, caplog):
    from relift_pl.checkpoint import resolve_ckpt_path

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"tag": "good"}, folder / "last.ckpt")
    (folder / "preempted.ckpt").write_bytes(b"PK\x03\x04 cut short")
    os.utime(folder / "last.ckpt", (1, 1))  # preempted.ckpt is the newer one
    with caplog.at_level("WARNING"):
        assert resolve_ckpt_path("last", tmp_path) == str(folder / "last.ckpt")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"checkpoint {folder / 'preempted.ckpt'} is truncated or corrupted")
    assert warning.endswith(f"ckpt_path=last resumes from {folder / 'last.ckpt'}, the newest intact one")
    (folder / "last.ckpt").write_bytes(b"damaged too")
    os.utime(folder / "last.ckpt", (1, 1))
    with pytest.raises(ValueError, match=r"preempted\.ckpt is truncated or corrupted"):
        resolve_ckpt_path("last", tmp_path)
