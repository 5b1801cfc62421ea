"""Exact resume with 2 ranks (gloo): DDP and FSDP2 runs stopped and resumed end where a straight
run ends, with the same logged metrics, and saving a checkpoint changes nothing."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_multiprocess import assert_same_params, launch_worker, run_worker  # noqa: E402

from toy_overrides import QUICK_TOY  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NO_EVAL = ["callbacks.evaluation.before_training=false", "callbacks.evaluation.after_training=false"]
# Some groups right, some all wrong (the quick toy base solves nothing): ranks differ in hardness.
STUB_REWARD = "reward._target_=stub_rewards.HashReward"


def test_random_buffer_resumes_every_ranks_own_draws(tmp_path):
    # algorithm=relift_random_buffer: each rank draws its buffer rows from its own generator (as
    # many as its hardest rows), so each rank must resume its own stream, not rank 0's.
    run = [*QUICK_TOY, *NO_EVAL, STUB_REWARD, "trainer=ddp", "algorithm=relift_random_buffer",
           "algorithm.buffer_threshold=2", "callbacks.checkpoint.every_n_train_steps=1"]
    straight = run_worker(tmp_path / "straight", [*run, "max_steps=4"])
    half = run_worker(tmp_path / "half", [*run, "max_steps=2"])
    checkpoint = tmp_path / "half" / "checkpoints" / "last.ckpt"
    resumed = run_worker(tmp_path / "resumed", [*run, "max_steps=4", f"ckpt_path={checkpoint}"])
    assert half[0]["mining"] != half[1]["mining"]  # the ranks' streams differ at the checkpoint
    assert straight[0]["sft_step"] >= 2
    for ours, theirs in zip(resumed, straight, strict=True):
        assert ours["buffer"] == theirs["buffer"]
        assert (ours["sft_step"], ours["mining"]) == (theirs["sft_step"], theirs["mining"])
        assert_same_params(ours["state"], theirs["state"])


# FSDP2, evaluated before training, every 2 steps and at the end, a checkpoint after every step.
FSDP2 = [*QUICK_TOY, STUB_REWARD, "trainer=fsdp", "logger=csv", "max_steps=4",
         "algorithm.buffer_threshold=2", "callbacks.evaluation.every_n_steps=2",
         "callbacks.checkpoint.every_n_train_steps=1"]


def _sigterm_in_evaluation(step: int) -> list[str]:
    return ["+callbacks.sigterm._target_=tests_helpers.SigtermAt", f"+callbacks.sigterm.step={step}",
            "+callbacks.sigterm.in_evaluation=true"]


def _logged(out: Path) -> dict[int, dict[str, str]]:
    """metrics.csv by step, without the timings (wall-clock numbers)."""
    with open(out / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_step: dict[int, dict[str, str]] = {}
    for row in rows:
        values = {k: v for k, v in row.items() if v != "" and not k.startswith(("timing/", "perf/"))}
        by_step.setdefault(int(float(row["step"])), {}).update(values)
    return by_step


def _step_count(checkpoint: Path) -> int:
    return torch.load(checkpoint / "meta.pt", weights_only=False)["relift"]["step_count"]


@pytest.fixture(scope="module")
def fsdp2_straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_straight")
    return out, run_worker(out, FSDP2)


def test_fsdp2_saving_checkpoints_changes_nothing(fsdp2_straight, tmp_path):
    # A save gave an optimizer without state a placeholder one (torch's get_optimizer_state_dict
    # steps it at lr 0: AdamW step 1), so its first real step ran as its second.
    _, every_step = fsdp2_straight
    at_the_end = run_worker(tmp_path, [*FSDP2, "callbacks.checkpoint.every_n_train_steps=0"])
    assert every_step[0]["sft_step"] >= 1
    assert_same_params(at_the_end[0]["state"], every_step[0]["state"])


def test_fsdp2_run_preempted_in_each_evaluation_resumes_exactly(fsdp2_straight, tmp_path):
    # SIGTERM during the evaluations of steps 0, 2 and 4 (the last), each run resumed with
    # ckpt_path=last: the same parameters, metrics.csv rows, evaluations and per-problem lines
    # as one straight run.
    straight_out, straight = fsdp2_straight
    out = tmp_path / "run"
    for step in (0, 2, 4):
        resume = ["ckpt_path=last"] if step else []
        run_worker(out, [*FSDP2, *_sigterm_in_evaluation(step), *resume])
        assert _step_count(out / "checkpoints" / "preempted.ckpt") == step
    resumed = run_worker(out, [*FSDP2, "ckpt_path=last"])
    assert (resumed[0]["rl_step"], resumed[0]["sft_step"]) == (straight[0]["rl_step"], straight[0]["sft_step"])
    for ours, theirs in zip(resumed, straight, strict=True):
        assert_same_params(ours["state"], theirs["state"])
    assert _logged(out) == _logged(straight_out)
    assert (out / "eval" / "per_problem.jsonl").read_text() == (straight_out / "eval" / "per_problem.jsonl").read_text()


def test_a_damaged_fsdp2_checkpoint_is_named_in_one_line(fsdp2_straight, tmp_path):
    from relift_pl.checkpoint import check_checkpoint_file

    straight_out, _ = fsdp2_straight
    damaged = tmp_path / "checkpoints" / "last.ckpt"
    shutil.copytree(straight_out / "checkpoints" / "last.ckpt", damaged)
    shard = damaged / "__1_0.distcp"
    # Truncated or missing: named before any model loads.
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(ValueError, match=r"is incomplete or corrupted .*no shard files __1_0\.distcp"):
        check_checkpoint_file(damaged)
    shard.unlink()
    with pytest.raises(ValueError, match=r"is incomplete or corrupted .*no shard files __1_0\.distcp"):
        check_checkpoint_file(damaged)
    # Corrupted with its size intact (an archive header zeroed). A non-tensor entry (torch would
    # unpickle anything there) is checked before any model loads; a tensor fails the load on both
    # ranks. Either way one line names the shard.
    entry = {kind: _entry_in(damaged, "__1_0.distcp", kind) for kind in ("bytes", "tensor")}
    shard.write_bytes(_zeroed(intact, entry["bytes"].offset))
    with pytest.raises(ValueError, match=r"is incomplete or corrupted .*its shard __1_0\.distcp is corrupted"):
        check_checkpoint_file(damaged)
    shard.write_bytes(_zeroed(intact, entry["tensor"].offset))
    check_checkpoint_file(damaged)
    proc = launch_worker(tmp_path / "resumed", [*FSDP2, f"ckpt_path={damaged}"])
    assert proc.returncode != 0
    expected = (f"checkpoint folder {damaged} could not be loaded (")
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "its shard __1_0.distcp is corrupted (a CRC check fails); resume from an earlier one" in proc.stderr


def _entry_in(folder: Path, shard: str, kind: str):
    """Where the first non-tensor ("bytes") or tensor entry stored in ``shard`` begins."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    wanted = {index.fqn for index in metadata.storage_data
              if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata) == (kind == "bytes")}
    return min((info for index, info in metadata.storage_data.items()
                if index.fqn in wanted and info.relative_path == shard), key=lambda info: info.offset)


def _zeroed(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes(64) + data[offset + 64:]
