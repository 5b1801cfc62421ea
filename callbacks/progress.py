"""A Rich progress bar that counts training steps up to ``max_steps``."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Shows ``step k/max_steps`` instead of Lightning's epoch counter: the data stream is
    endless and a run is sized in training steps."""

    @property
    def total_train_batches(self) -> int:
        return self.trainer.lightning_module.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return "train steps"

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        # batch_idx restarts at 0 after a resume; the module's counter does not.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, pl_module.step_count - 1)
