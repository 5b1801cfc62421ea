"""0/1 answer rewards with math-verify, hardened for RL training (ReLIFT step 3).

Why worker processes: math-verify bounds its work with ``signal.alarm``, which only works on a
process's main thread (in trainer threads it raises, or with timeouts off nothing bounds a
pathological input), and an alarm cannot fire inside one long C call such as a huge big-int
multiplication. So math items are graded in subprocesses, on their main thread, where the library's
alarm (set to half the budget) cuts most hangs cheaply; the parent enforces an outer per-item
wall clock and kills and replaces a worker that overruns it; each worker runs under an address-space
limit so a hostile completion cannot exhaust the trainer's memory.

Workers are plain ``python -c`` subprocesses talking over a socket pair, not multiprocessing
``spawn``/``forkserver`` children: those re-import the trainer's ``__main__`` (torch, Lightning, 10 s
and gigabytes of address space) in every worker; ``fork`` is unsafe in a threaded trainer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Literal

from math_verify import parse, verify

from relift_pl.rewards import extract

OK, TIMEOUT, FAILURE = "ok", "timeout", "failure"
GRADING_MODES = extract.GRADING_MODES
_STARTUP_TIMEOUT_S = 120.0  # a fresh interpreter importing sympy; slow on a loaded machine
# Ctrl-C and a scheduler's SIGTERM (sent to every process of the job) are the trainer's to
# handle: it finishes the step, whose rewards need the workers, then stops them itself. A worker
# starts with both blocked (see _spawn) and ignores them before its slow imports (sympy).
_PREEMPTION_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_WORKER_CMD = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM}); "
    "import sys; from relift_pl.rewards.verifier import _worker_main; _worker_main(sys.argv)"
)


@dataclass
class RewardOutput:
    """Rewards of one batch and what went wrong while computing them."""

    rewards: list[float]  # one 0.0/1.0 per response, in input order
    timeouts: int  # items whose verification hit a time limit (scored 0)
    failures: int  # items whose worker crashed, ran out of memory or raised (scored 0)


class _LibraryEvents(logging.Handler):
    """Notices what math-verify only logs: its own alarm firing, or a swallowed MemoryError."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.status = OK

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Timeout during"):
            self.status = TIMEOUT
        elif record.exc_info and isinstance(record.exc_info[1], MemoryError):
            self.status = FAILURE


def _grade(gold: str, pred: str, timeout: int | None, events: _LibraryEvents) -> tuple[float, str]:
    """Grades one normalised (gold, prediction) pair: returns (reward, status)."""
    events.status = OK
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        pred_parsed = parse(f"${pred}$", parsing_timeout=timeout)
        correct = verify(gold_parsed, pred_parsed, timeout_seconds=timeout)
    except Exception:  # MemoryError included; the library already swallows most errors
        return 0.0, FAILURE
    return (1.0, OK) if correct else (0.0, events.status)


_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")


def gold_is_readable(gold: str, timeout: int = 5) -> bool:
    """Whether math-verify reads ``gold`` (normalised as grading does) as math rather than only
    as a string, which just its exact copy would match. Bounded by ``timeout`` seconds on the
    main thread (math-verify's alarm); elsewhere unbounded, so pass only short golds."""
    gold = extract.normalize_gold(gold)
    if _PLAIN_NUMBER.fullmatch(gold):  # most golds; parsing one takes ~1 ms
        return True
    on_main = threading.current_thread() is threading.main_thread()
    try:
        parsed = parse(f"${gold}$", parsing_timeout=timeout if on_main else None)
    except Exception:  # noqa: BLE001 -- a gold the parser chokes on is not readable
        return False
    return any(not isinstance(value, str) for value in parsed)


def _limit_memory(headroom_mb: int) -> None:
    """Caps the address space at the current footprint plus ``headroom_mb`` (Linux /proc)."""
    import resource  # Unix only; imported here so the module imports everywhere

    with open("/proc/self/statm") as f:
        base = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = base + headroom_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))


def _worker_main(argv: list[str]) -> None:
    """Worker loop: grades (batch, [(idx, gold, pred), ...]) messages, one reply per item."""
    fd, memory_mb, library_timeout = (int(a) for a in argv[1:4])
    conn = Connection(fd)
    events = _LibraryEvents()
    library_logger = logging.getLogger("math_verify")
    library_logger.addHandler(events)
    library_logger.setLevel(logging.DEBUG)  # MemoryErrors it swallows are logged at debug level
    library_logger.propagate = False  # counted, not printed
    if memory_mb > 0:
        _limit_memory(memory_mb)
    conn.send(("ready", os.getpid()))
    with contextlib.suppress(EOFError, OSError):  # EOF or a broken pipe: the trainer went away
        while (message := conn.recv()) is not None:
            batch, items = message
            for idx, gold, pred in items:
                conn.send((batch, idx, *_grade(gold, pred, library_timeout or None, events)))


@dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Connection


def _stop_workers(workers: list[_Worker]) -> None:
    """Asks each worker to exit, kills it if it does not, and reaps it (no zombies)."""
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.conn.send(None)
    for worker in workers:
        try:
            worker.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()
        worker.conn.close()
    workers.clear()


class MathVerifyReward:
    """ReLIFT's 0/1 reward: math-verify on the last ``\\boxed{}`` after ``</think>``.

    Per response: no ``</think>`` scores 0 (if required); the answer part is the text after the
    last ``</think>`` (else the whole response); in math mode no box scores 0, a box whose
    normalised content equals the normalised gold scores 1 without a round trip (an exactness
    shortcut, not a different grader), anything else is ``verify(parse($gold$), parse($box$))``.
    ``timeouts`` counts items cut by the outer deadline or by math-verify's own alarm;
    ``failures`` counts worker crashes, exceptions escaping math-verify and the MemoryErrors it
    logs (ones that sympy or math-verify swallow silently just score 0).

    Args:
        require_think_close: Score 0 when the response has no ``</think>`` (reference behaviour).
        timeout_s: Outer wall-clock budget per item; an item over it scores 0, counts in
            ``timeouts``, and its worker is killed and replaced.
        num_workers: Worker processes kept alive across calls. 0 grades in-process on the
            caller's main thread with only math-verify's own alarms: for debugging only.
        memory_limit_mb: Address-space headroom of each worker above its footprint after imports
            (RLIMIT_AS); None disables the limit.
        mode: "math" (boxed answer vs gold with math-verify), "choice" (gold is a choice letter
            A-E or digit 1-5, compared case-insensitively), "integer" (the toy worlds: the box
            holds one integer literal equal to the gold's; no math-verify, which would evaluate
            a copied question such as ``12+5+4+6``), or "auto" (choice when the gold is a single
            letter A-E, math otherwise; digit golds are math).
    """

    def __init__(
        self,
        require_think_close: bool = True,
        timeout_s: float = 5.0,
        num_workers: int = 1,
        memory_limit_mb: int | None = 2048,
        mode: Literal["math", "choice", "integer", "auto"] = "auto",
    ) -> None:
        if mode not in GRADING_MODES:
            raise ValueError(f"reward.mode must be one of {', '.join(GRADING_MODES)}; got {mode!r}")
        # A zero budget would score every response 0 without a word: reject it up front.
        if not timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0 (seconds per item), got {timeout_s}")
        if num_workers < 0:
            raise ValueError(f"reward.num_workers must be >= 0 (0: grade in-process), got {num_workers}")
        if memory_limit_mb is not None and memory_limit_mb <= 0:
            raise ValueError(f"reward.memory_limit_mb must be > 0 or null (no limit), got {memory_limit_mb}")
        self.require_think_close = require_think_close
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self.memory_limit_mb = memory_limit_mb
        self.mode = mode
        self._workers: list[_Worker] = []
        self._batch = 0
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        self._workers.extend(self._spawn() for _ in range(num_workers))

    def __call__(
        self, responses: list[str], golds: list[str], modes: list[str | None] | None = None
    ) -> RewardOutput:
        """Scores each response against its gold answer; see the class docstring.

        Args:
            responses: decoded completions.
            golds: one gold answer per response.
            modes: optional per-item grading mode (one of ``GRADING_MODES``; None for the
                reward's own ``mode``), e.g. ``choice`` for ARC-c's digit-numbered options.
        """
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        modes = modes if modes is not None else [None] * len(golds)
        if len(modes) != len(golds):
            raise ValueError(f"{len(modes)} modes but {len(golds)} golds")
        rewards = [0.0] * len(responses)
        jobs = []
        for idx, (response, gold, mode) in enumerate(zip(responses, golds, modes, strict=True)):
            score, job = self._prescore(response, gold, mode or self.mode)
            if job is None:
                rewards[idx] = score
            else:
                jobs.append((idx, *job))
        if self.num_workers and not self._workers and jobs:
            raise RuntimeError("MathVerifyReward is closed")
        results = self._grade_in_process(jobs) if self.num_workers == 0 else self._grade_pool(jobs)
        for idx, (reward, _) in results.items():
            rewards[idx] = reward
        statuses = [status for _, status in results.values()]
        return RewardOutput(rewards, statuses.count(TIMEOUT), statuses.count(FAILURE))

    def _prescore(
        self, response: str, gold: str, mode: str
    ) -> tuple[float, tuple[str, str] | None]:
        """Cheap in-parent scoring; returns (score, None) or (0, (gold, pred)) for math-verify."""
        if mode not in GRADING_MODES:
            raise ValueError(f"unknown grading mode {mode!r}")
        _, answer = extract.split_think(response)
        if answer is None:
            if self.require_think_close:
                return 0.0, None
            answer = response
        raw_gold, gold = gold, extract.normalize_gold(gold)
        if mode == "auto":
            mode = "choice" if len(gold) == 1 and gold in "ABCDE" else "math"
        if mode == "choice":
            gold = gold.strip("()").upper()
            letters = "12345" if gold.isdigit() else "ABCDE"
            return float(extract.extract_choice_letter(answer, letters) == gold), None
        boxed = extract.last_boxed(answer)
        if boxed is None:
            return 0.0, None
        if mode == "integer":
            pred_int, gold_int = extract.integer_literal(boxed), extract.integer_literal(gold)
            return float(pred_int is not None and pred_int == gold_int), None
        pred = extract.normalize_answer(boxed)
        # Exactness shortcut: the gold itself, as the grader reads it or as it is written (a
        # Python-notation gold such as -1./3 is only rewritten on the gold's side).
        if pred in (gold, extract.normalize_answer(raw_gold)):
            return 1.0, None
        return 0.0, (gold, pred)

    def _grade_in_process(self, jobs: list[tuple]) -> dict[int, tuple]:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("num_workers=0 needs the main thread: math-verify uses SIGALRM")
        events = _LibraryEvents()
        library_logger = logging.getLogger("math_verify")
        library_logger.addHandler(events)
        try:
            limit = max(1, math.ceil(self.timeout_s))
            return {idx: _grade(gold, pred, limit, events) for idx, gold, pred in jobs}
        finally:
            library_logger.removeHandler(events)

    def _grade_pool(self, jobs: list[tuple]) -> dict[int, tuple]:
        """Sends contiguous chunks to the workers; enforces the per-item deadline while reading."""
        results: dict[int, tuple] = {}
        pending: dict[int, deque] = {}
        deadline: dict[int, float] = {}
        size = math.ceil(len(jobs) / self.num_workers) if jobs else 1
        self._batch += 1  # replies from an interrupted earlier call carry an older id

        def dispatch(slot: int) -> None:
            if not pending[slot]:
                del pending[slot]
                return
            worker = self._workers[slot]
            try:
                if worker.proc.poll() is not None:
                    raise BrokenPipeError("worker died while idle")
                worker.conn.send((self._batch, list(pending[slot])))
            except OSError:
                self._replace(slot)
                self._workers[slot].conn.send((self._batch, list(pending[slot])))
            deadline[slot] = time.monotonic() + self.timeout_s

        def give_up(slot: int, status: str) -> None:
            idx = pending[slot].popleft()[0]
            results[idx] = (0.0, status)
            self._replace(slot)
            dispatch(slot)

        for slot in range(self.num_workers):
            pending[slot] = deque(jobs[slot * size : (slot + 1) * size])
            dispatch(slot)
        while pending:
            by_conn = {self._workers[slot].conn: slot for slot in pending}
            timeout = max(0.0, min(deadline[slot] for slot in pending) - time.monotonic())
            for conn in wait(list(by_conn), timeout):
                slot = by_conn[conn]
                try:
                    batch, idx, reward, status = conn.recv()
                except (EOFError, OSError):  # crashed (segfault, killed, out of memory)
                    give_up(slot, FAILURE)
                    continue
                if batch != self._batch:
                    continue
                pending[slot].popleft()  # workers answer in order: this was the head item
                results[idx] = (reward, status)
                deadline[slot] = time.monotonic() + self.timeout_s
                if not pending[slot]:
                    del pending[slot]
            now = time.monotonic()
            for slot in [s for s in pending if deadline[s] <= now]:
                give_up(slot, TIMEOUT)
        return results

    def _spawn(self) -> _Worker:
        """Starts one worker and waits until it has imported math-verify."""
        parent_conn, child_conn = multiprocessing.Pipe()
        # Make relift_pl importable in the child even when it is not pip-installed.
        root = str(Path(__file__).resolve().parents[2])
        paths = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        library_timeout = int(self.timeout_s // 2)  # 0: off, the outer timeout alone applies
        args = [str(child_conn.fileno()), str(self.memory_limit_mb or 0), str(library_timeout)]
        # Blocked here across the fork and exec (a signal to the trainer meanwhile waits, and is
        # handled once they are unblocked), so the worker holds them blocked until it ignores them.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _PREEMPTION_SIGNALS)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CMD, *args],
                pass_fds=(child_conn.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child_conn.close()
        worker = _Worker(proc, parent_conn)
        try:
            if not parent_conn.poll(_STARTUP_TIMEOUT_S):
                raise EOFError
            parent_conn.recv()
        except (EOFError, OSError) as err:
            _stop_workers([worker])
            raise RuntimeError("reward worker failed to start; see its stderr") from err
        return worker

    def _replace(self, slot: int) -> None:
        """Kills (and reaps) the worker in ``slot`` and starts a fresh one."""
        old = self._workers[slot]
        old.proc.kill()
        old.proc.wait()
        old.conn.close()
        self._workers[slot] = self._spawn()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (monitoring, tests)."""
        return [worker.proc.pid for worker in self._workers]

    def close(self) -> None:
        """Stops and reaps all workers; safe to call twice."""
        self._finalizer()

    def __enter__(self) -> MathVerifyReward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
