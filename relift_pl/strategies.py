"""FSDP2 through Lightning's ModelParallelStrategy, with sharded checkpoints written atomically
and saves that leave training untouched.

Lightning writes a distributed checkpoint folder in place: a kill mid-save leaves a folder
that mixes two steps' shards under the real name. Here every rank writes into
``<name>.tmp``, all ranks wait, and rank 0 swaps the finished folder into place (the old one is
renamed aside, then removed), so ``<name>`` is always one complete save.

torch's ``get_optimizer_state_dict`` (used to save, and to load) gives an optimizer that has
no state yet a placeholder one: it steps it at lr 0, so AdamW's moments exist with step 1, and
its first real step runs as its second (another bias correction). The SFT AdamW waits for the
buffer to fill, so a checkpoint before its first step changed training. Here such an
optimizer is saved with its placeholder, left stateless, and named in the checkpoint, so that
a resume drops the placeholder it loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy as _ModelParallelStrategy
from torch.distributed.checkpoint.api import CheckpointException

from relift_pl.checkpoint import unreadable_checkpoint
from relift_pl.export import replace_dir

# The checkpoint key listing the optimizers (by index) that had no state when it was saved.
STATELESS_OPTIMIZERS = "relift_stateless_optimizers"


class ModelParallelStrategy(_ModelParallelStrategy):
    """Lightning's ModelParallelStrategy whose sharded checkpoint saves are atomic and leave an
    optimizer without state as it was (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stateless_at_save: set[int] = set()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        inner = getattr(optimizer, "_optimizer", optimizer)  # Lightning's wrapper, if any
        stateless = not inner.state
        state = super().optimizer_state(optimizer)
        if stateless:
            inner.state.clear()  # the placeholder is in `state`, not in the optimizer
            self._stateless_at_save.add(self.optimizers.index(inner))
        return state

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            metadata = super().load_checkpoint(checkpoint_path, weights_only)
        except (Exception, CheckpointException) as err:  # torch internals: one line naming the file
            raise unreadable_checkpoint(Path(checkpoint_path), err) from err
        for index in metadata.pop(STATELESS_OPTIMIZERS, ()):
            self.optimizers[index].state.clear()
        return metadata

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any = None) -> None:
        # Still stateless now (a state dict taken for anything but this save must not count).
        checkpoint[STATELESS_OPTIMIZERS] = sorted(i for i in self._stateless_at_save if not self.optimizers[i].state)
        self._stateless_at_save = set()
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
