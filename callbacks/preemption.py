"""Preemption: SIGTERM/SIGINT saves a checkpoint at the next safe point and stops cleanly."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import torch

from relift_pl.distributed import all_reduce_sum
from relift_pl.loggers import flush_loggers
from relift_pl.signals import SignalLatch, take_signal_from_start


class PreemptionCheckpoint(L.Callback):
    """Turns SIGTERM and SIGINT into "finish this training step, save, stop".

    The safe point is the end of a training step (after its RL and SFT updates and the other
    callbacks), so the checkpoint resumes exactly. All ranks agree on stopping through one
    tiny all-reduce per step, so no rank is left waiting in a collective.

    Its handler is the only one in force from ``setup`` to ``teardown`` (the final step's
    evaluation, saves and export run in later ``on_train_end`` hooks); before ``setup``, train.py's
    :func:`relift_pl.signals.catch_from_start` holds a signal for it.

    Args:
        dirpath: where ``preempted.ckpt`` is written (the run's checkpoints folder).
        signals: signal names to catch.
    """

    def __init__(self, dirpath: str, signals: tuple[str, ...] = ("SIGTERM", "SIGINT")) -> None:
        self.dirpath = Path(dirpath)
        self.latch = SignalLatch(tuple(getattr(signal, name) for name in signals))
        self.saved_path: Path | None = None

    @property
    def received(self) -> int | None:
        """The signal this rank received, if any."""
        return self.latch.received

    def setup(self, trainer: L.Trainer, module, stage: str) -> None:
        if trainer.is_global_zero:
            self.latch.announce = (
                "\nReceived {name}: saving a checkpoint at the end of this training step, then "
                "stopping (Ctrl-C again stops at once, without one).\n"
            )
        self.latch.received = self.latch.received or take_signal_from_start()
        self.latch.install()
        # Lightning registers its own SIGTERM handler just before training (it kills the other
        # ranks' processes and broadcasts from inside the handler, a collective the other ranks
        # are not in) and reinstalls at teardown what it found: keep it off our signals.
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            register = connector._register_signal

            def register_others(sig, handler) -> None:
                if sig not in self.latch.signals:
                    register(sig, handler)

            connector._register_signal = register_others
        # First in the callback list: a signal that came before a step stops it first.
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)

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
        flush_loggers(trainer)
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

    def teardown(self, trainer: L.Trainer, module, stage: str) -> None:
        self.latch.restore()

    def on_exception(self, trainer: L.Trainer, module, exception: BaseException) -> None:
        self.latch.restore()
