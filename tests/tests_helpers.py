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
