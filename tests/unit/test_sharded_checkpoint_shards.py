"""A sharded checkpoint counts only with every rank's shard in its folder (relift_pl.checkpoint.
missing_shards): a rank whose checkpoint folder is on its own disk writes its shard elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from relift_pl.checkpoint import check_checkpoint_file, missing_shards
from relift_pl.strategies import _shard_owners


@pytest.fixture
def sharded(tmp_path):
    """A one-process distributed checkpoint, laid out as Lightning writes one (+ meta.pt)."""
    folder = tmp_path / "last.ckpt"
    dcp.save({"w": torch.arange(1000.0), "b": torch.ones(3)}, checkpoint_id=folder)
    torch.save({"global_step": 2}, folder / "meta.pt")
    return folder


def test_a_complete_folder_lacks_nothing(sharded):
    assert missing_shards(sharded) == []
    assert check_checkpoint_file(sharded) == sharded


def test_an_absent_or_short_shard_is_missing(sharded):
    (shard,) = sharded.glob("*.distcp")
    assert shard.name == "__0_0.distcp"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)  # a copy cut short
    assert missing_shards(sharded) == ["__0_0.distcp"]
    shard.unlink()
    assert missing_shards(sharded) == ["__0_0.distcp"]
    with pytest.raises(ValueError, match=r"incomplete or corrupted .*no shard files __0_0.distcp"):
        check_checkpoint_file(sharded)


def test_missing_files_are_told_by_rank():
    assert _shard_owners(["__1_0.distcp"]) == "rank 1's shard"
    assert _shard_owners(["__1_0.distcp", "__3_0.distcp", "__3_1.distcp"]) == "the shards of ranks 1, 3"


def test_a_load_that_fails_names_the_corrupted_shard(sharded):
    from relift_pl.checkpoint import unreadable_checkpoint

    shard = sharded / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 32] = bytes(32)  # bit rot inside a tensor: sizes intact
    shard.write_bytes(bytes(data))
    assert check_checkpoint_file(sharded) == sharded  # every shard there, as long as it says
    error = unreadable_checkpoint(sharded, RuntimeError("PytorchStreamReader failed\nmore"))
    assert str(error) == (
        f"checkpoint folder {sharded} could not be loaded (RuntimeError: PytorchStreamReader failed); "
        "its shard __0_0.distcp is corrupted (a CRC check fails); resume from an earlier one with "
        "ckpt_path=<path> (see the checkpoints/ folder)"
    )
