"""Preemption signals (SIGTERM, SIGINT), caught from the first line of a training process.

A scheduler's SIGTERM can come at any moment, also while the process imports, builds and loads
its model (minutes at 7B), before the trainer and its preemption callback exist: Python's
default would end the process there (SIGTERM) or raise a KeyboardInterrupt (Ctrl-C). train.py
calls :func:`catch_from_start` before its other imports; the preemption callback takes the
signal over (:func:`take_signal_from_start`) and stops the run before its first step. Standard
library only, so that installing it costs nothing.
"""

from __future__ import annotations

import os
import signal

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalLatch:
    """Records the first of ``signals`` it receives; a second SIGINT (Ctrl-C twice) restores
    the previous handlers and raises KeyboardInterrupt.

    Args:
        signals: the signals to catch.
    """

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self.announce: str | None = None
        """Written to stderr when the first signal arrives ({name}: the signal's name)."""
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in self.signals:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        """Puts back the handlers found at the first ``install``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            if self.announce:  # os.write: print() is not safe inside a signal handler
                os.write(2, self.announce.format(name=signal.Signals(signum).name).encode())


_from_start: SignalLatch | None = None


def catch_from_start() -> SignalLatch:
    """Installs the process's first preemption handler (train.py, before its other imports)."""
    global _from_start
    _from_start = SignalLatch()
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0":
        _from_start.announce = (
            "\nReceived {name} while starting: the run stops before its first step, with a "
            "checkpoint (Ctrl-C again stops at once, without one).\n"
        )
    _from_start.install()
    return _from_start


def take_signal_from_start() -> int | None:
    """The signal :func:`catch_from_start` received, if any; once (a later fit in the same
    process does not see it again)."""
    if _from_start is None:
        return None
    received, _from_start.received = _from_start.received, None
    return received
