"""FSDP2 through Lightning's ModelParallelStrategy, with sharded checkpoints written atomically.

Lightning writes a distributed checkpoint folder in place: a kill mid-save leaves a folder
that mixes two steps' shards under the real name. Here every rank writes into
``<name>.tmp``, all ranks wait, and rank 0 swaps the finished folder into place (the old one is
renamed aside, then removed), so ``<name>`` is always one complete save.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy as _ModelParallelStrategy

from relift_pl.export import replace_dir


class ModelParallelStrategy(_ModelParallelStrategy):
    """Lightning's ModelParallelStrategy whose sharded checkpoint saves are atomic."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f"{path.name}.tmp")
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier("relift_checkpoint_tmp_clear")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("relift_checkpoint_written")  # every rank's shards and rank 0's metadata
        if self.global_rank == 0:
            replace_dir(tmp, path)
        self.barrier("relift_checkpoint_in_place")
