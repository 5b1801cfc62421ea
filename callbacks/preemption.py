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

    def setup(self, trainer: L.Trainer, module, stage: str) -> None:
        # Installed from setup on: a signal while the model loads or the first evaluation runs
        # (long at 7B) must still end in a checkpoint and a clean stop, not a silent exit 0.
        self._announce = trainer.is_global_zero
        self._install()
        # First in the callback list, so on_train_start reinstalls our handler before the
        # evaluation callback's on_train_start runs the before-training evaluation.
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        # Lightning registers its own SIGTERM handler just before training starts (it kills the
        # other ranks' processes and broadcasts from inside the handler): replace it again.
        self._install()
        # Lightning's teardown (also after an exception) reinstalls the handlers it found when it
        # registered, ours: point it at the ones from before the run instead.
        found = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(found, dict):
            found.update({sig: handler for sig, handler in self._previous.items() if sig in found})

    def _install(self) -> None:
        for sig in self.signals:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stop_agreed(self, module) -> bool:
        """Whether any rank got a signal (one tiny all-reduce: every rank stops at the same step)."""
        flag = torch.tensor(1.0 if self.received is not None else 0.0, device=module.device, dtype=torch.float32)
        return float(all_reduce_sum(flag)) > 0

    def on_train_batch_start(self, trainer: L.Trainer, module, *args) -> None:
        # A signal that came before this step (during setup or after the last step's end): stop
        # before it.
        if not module.preempted and self.stop_agreed(module):
            self.save_and_stop(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module, *args) -> None:
        if self.stop_agreed(module):
            self.save_and_stop(trainer, module)

    def save_and_stop(self, trainer: L.Trainer, module) -> None:
        """Writes ``preempted.ckpt`` (every rank calls it) and stops the run; once per run."""
        if module.preempted:
            return
        self.saved_path = self.dirpath / "preempted.ckpt"
        trainer.save_checkpoint(self.saved_path, weights_only=False)  # everything, to resume
        module.preempted = True  # the module skips any further step
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

    def teardown(self, trainer: L.Trainer, module, stage: str) -> None:
        # Lightning's own teardown reinstalls the handler it found at registration (ours).
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, module, exception: BaseException) -> None:
        self._restore_handlers()
