"""Small helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

import logging
from pathlib import Path

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
