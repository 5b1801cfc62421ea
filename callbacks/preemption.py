"""Preemption: SIGTERM/SIGINT saves a checkpoint at the next safe point and stops cleanly."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch

from relift_pl.distributed import all_reduce_sum


class PreemptionCheckpoint(L.Callback):
    """Turns SIGTERM and SIGINT into "finish this training step, save, stop".

    The safe point is the end of a training step (after its RL and SFT updates and the other
    callbacks), so the checkpoint resumes exactly. All ranks agree on stopping through one
    tiny all-reduce per step, so no rank is left waiting in a collective.

    Args:
        dirpath: where ``preempted.ckpt`` is written (the run's checkpoints folder).
        signals: signal names to catch.
    """

    def __init__(self, dirpath: str, signals: tuple[str, ...] = ("SIGTERM", "SIGINT")) -> None:
        self.dirpath = Path(dirpath)
        self.signals = tuple(getattr(signal, name) for name in signals)
        self.received: int | None = None
        self.saved_path: Path | None = None
        self._previous: dict[int, object] = {}
        self._announce = False

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            # A second Ctrl-C: stop now, without a new checkpoint (the saved ones stay intact).
            self._restore_handlers()
            raise KeyboardInterrupt
        self.received = signum
        if self._announce:  # os.write: print() is not safe inside a signal handler
            os.write(2, (
                f"\nReceived {signal.Signals(signum).name}: saving a checkpoint at the end of this "
                "training step, then stopping (Ctrl-C again stops at once, without one).\n"
            ).encode())

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        self._announce = trainer.is_global_zero
        # Installed after Lightning's own handlers, replacing them for the duration of training:
        # Lightning would stop on SIGTERM without a checkpoint, and on SIGINT mid-step.
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, module, *args) -> None:
        flag = torch.tensor(1.0 if self.received is not None else 0.0, device=module.device)
        if float(all_reduce_sum(flag)) == 0:
            return
        self.saved_path = self.dirpath / "preempted.ckpt"
        trainer.save_checkpoint(self.saved_path)
        module.preempted = True
        trainer.should_stop = True
        if trainer.is_global_zero:
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            print(
                f"\nReceived {name}: saved {self.saved_path} after training step "
                f"{module.step_count}. Resume with the same overrides plus\n"
                f"  ckpt_path={self.saved_path}\n"
                "(or hydra.run.dir=<this run's folder> ckpt_path=last)."
            )

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, module, exception: BaseException) -> None:
        self._restore_handlers()
