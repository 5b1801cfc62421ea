"""Small helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

import logging
import os
import signal
from pathlib import Path

import lightning as L

CONF = Path(__file__).resolve().parents[1] / "conf"


def config_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


class MessageCollector(logging.Handler):
    """Keeps every message a logger emits (Lightning's loggers do not propagate to pytest's)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def fit_with_callbacks(cfg, callbacks=(), training: bool = True):
    """Builds a run as train.py does and fits it with ``callbacks`` first in the list (they see
    each step before the run's own callbacks); returns the module. Reward workers stop even when
    the fit raises."""
    from relift_pl.train import build

    trainer, module, datamodule = build(cfg, training=training)
    trainer.callbacks[:0] = list(callbacks)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        module.teardown("fit")
    return module


class SigtermAt(L.Callback):
    """Sends its own process a real SIGTERM during training step ``step`` (after its RL update),
    or with ``in_evaluation`` during the evaluation that follows the step (at its first generate
    call; step 0: the before-training evaluation); on rank ``rank`` only.

    A run config adds it with ``+callbacks.sigterm._target_=tests_helpers.SigtermAt`` (and
    ``+callbacks.sigterm.step=N``), so multi-process workers get it on every rank.
    """

    def __init__(self, step: int, in_evaluation: bool = False, rank: int = 0) -> None:
        self.step, self.in_evaluation, self.rank = step, in_evaluation, rank
        self._armed = False

    def setup(self, trainer, module, stage: str) -> None:
        trainer.callbacks.remove(self)  # ahead of the evaluation callback, whose hooks it precedes
        trainer.callbacks.insert(0, self)

    def on_train_start(self, trainer, module) -> None:
        self._armed = self.in_evaluation and module.step_count == self.step

    def on_rl_step_end(self, trainer, module, record) -> None:
        if not self.in_evaluation and module.step_count + 1 == self.step:
            self._send(trainer)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self._armed = self.in_evaluation and module.step_count == self.step

    def on_before_rollout(self, trainer, module) -> None:
        if self._armed:
            self._armed = False
            self._send(trainer)

    def _send(self, trainer) -> None:
        if trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)
