"""Preemption: SIGTERM / SIGINT mid-run saves a checkpoint, exits cleanly, and resumes exactly.

``python train.py`` runs as a subprocess: a long run gets SIGTERM after its first step; a second
run in the same folder resumes it with ``ckpt_path=last`` and gets SIGINT after its first step;
its checkpoints must equal those of one straight in-process run. Each signal goes to the whole
training process tree (the trainer and its reward workers), as a cluster scheduler's SIGTERM or a
terminal's Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import compose_cfg
from relift_pl.train import fit
from toy_overrides import QUICK_TOY

ROOT = Path(__file__).resolve().parents[2]
RUN = [
    *QUICK_TOY,
    "logger=csv",
    "callbacks.evaluation.before_training=false",
    "callbacks.evaluation.after_training=false",
    "callbacks.progress_bar=null",
    # A checkpoint after every step (its appearance tells that a step has run); no last.ckpt,
    # so `ckpt_path=last` must find preempted.ckpt.
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.checkpoint.save_last=false",
    "data.train_rows.levels=[3,4]",
    "algorithm.buffer_threshold=3",
]
RESUME_MESSAGE = re.compile(
    r"Received (SIG\w+): saved (\S+) after training step (\d+)\. Resume with the same overrides plus\n"
    r"  ckpt_path=(\S+)\n\(or hydra\.run\.dir=<this run's folder> ckpt_path=last\)\."
)


def _train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        "timeout",
        "-k",
        "10",
        "300",
        sys.executable,
        "train.py",
        *RUN,
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread exited meanwhile
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _tree(pid: int) -> list[int]:
    pids = [pid]
    for child in _children(pid):
        pids += _tree(child)
    return pids


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _interrupt(run_dir: Path, sig: signal.Signals, after_step: int, *overrides: str):
    """Starts a long run, signals it once step ``after_step`` is checkpointed; returns
    (returncode, stdout, stderr, the step it stopped after)."""
    proc = _train(run_dir, "max_steps=200", *overrides)
    try:
        checkpoint = run_dir / "checkpoints" / f"step-{after_step:06d}.ckpt"
        deadline = time.monotonic() + 240
        while not checkpoint.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = _finish(proc, timeout=10)
                pytest.fail(
                    f"step {after_step} never ran (rc {proc.returncode}):\n{out}\n{err[-3000:]}"
                )
            time.sleep(0.05)
        # The trainer and its reward workers, not `timeout` (it would forward a second copy).
        (python,) = _children(proc.pid)
        for pid in _tree(python):
            os.kill(pid, sig)
    except BaseException:
        _finish(proc, timeout=1)
        raise
    out, err = _finish(proc)
    match = RESUME_MESSAGE.search(out)
    return proc.returncode, out, err, match


def _load(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def _policy(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state["state_dict"].items() if k.startswith("policy.")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("preempted")
    first = _interrupt(run_dir, signal.SIGTERM, 1)
    assert first[0] == 0 and first[3], f"{first[1]}\n{first[2][-3000:]}"
    stopped = int(first[3].group(3))
    first_checkpoint = _load(run_dir / "checkpoints" / "preempted.ckpt")
    second = _interrupt(run_dir, signal.SIGINT, stopped + 1, "ckpt_path=last")
    return run_dir, first, first_checkpoint, second


def _check_clean_stop(result, name: str, run_dir: Path) -> int:
    rc, out, err, match = result
    assert rc == 0, err[-3000:]
    assert match, out
    preempted = run_dir / "checkpoints" / "preempted.ckpt"
    assert match.group(1, 2, 4) == (name, str(preempted), str(preempted))
    assert f"Received {name}: saving a checkpoint at the end of this training step" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    return int(match.group(3))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(runs):
    run_dir, first, first_checkpoint, _ = runs
    stopped = _check_clean_stop(first, "SIGTERM", run_dir)
    # Signalled once step 1 was checkpointed: stopped at a step's end, that of step 2 if it had
    # begun, else before it.
    assert first_checkpoint["relift"]["step_count"] == stopped
    assert stopped in (1, 2)


def test_resumed_run_continues_and_sigint_saves_and_exits_cleanly(runs):
    run_dir, first, _, second = runs
    resumed_from = int(first[3].group(3))
    stopped = _check_clean_stop(second, "SIGINT", run_dir)
    assert stopped > resumed_from
    assert _load(run_dir / "checkpoints" / "preempted.ckpt")["relift"]["step_count"] == stopped
    # Every step's checkpoint is there, the one the resume started from included (a step
    # preempted before its saves has them done by its resume); the last step's only if the
    # signal came after them (before the next step began): a step preempted at its end is saved
    # once, as preempted.ckpt (the grace period is short).
    saved_before_signal = stopped == resumed_from + 1  # the signal followed that step's checkpoint
    written = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt"))
    assert written == [f"step-{s:06d}.ckpt" for s in range(1, stopped + saved_before_signal)]


def test_preempted_and_resumed_run_matches_a_straight_run(runs, tmp_path):
    run_dir, first, _, second = runs
    stopped = int(second[3].group(3))
    straight_dir = tmp_path / "straight"
    fit(compose_cfg([*RUN, f"max_steps={stopped}"], output_dir=straight_dir))
    resumed_from = int(first[3].group(3))
    pairs = [
        # The step resumed from (written by the resume when the first run stopped at its end),
        # the first step after the resume, and the end of the resumed run.
        (f"step-{resumed_from:06d}.ckpt", f"step-{resumed_from:06d}.ckpt"),
        (f"step-{resumed_from + 1:06d}.ckpt", f"step-{resumed_from + 1:06d}.ckpt"),
        ("preempted.ckpt", f"step-{stopped:06d}.ckpt"),
    ]
    for ours, theirs in pairs:
        a, b = _load(run_dir / "checkpoints" / ours), _load(straight_dir / "checkpoints" / theirs)
        pa, pb = _policy(a), _policy(b)
        assert pa.keys() == pb.keys()
        for name, value in pb.items():
            assert torch.equal(value, pa[name]), (ours, name)
        for key in ("step_count", "rl_step", "sft_step", "demos_used", "buffer", "skipped_steps"):
            assert a["relift"][key] == b["relift"][key], (ours, key)
        for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
            for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
                assert torch.equal(sa["exp_avg"], sb["exp_avg"]), ours


def _python_catching_sigterm(pid: int) -> bool:
    """Whether ``pid`` runs this Python (not a forked ``timeout`` before its exec, which holds
    ``timeout``'s own handlers) and has installed a SIGTERM handler (bit 15 of SigCgt)."""
    with contextlib.suppress(OSError):  # not started yet, or gone
        if Path(f"/proc/{pid}/exe").resolve() != Path(sys.executable).resolve():
            return False
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_sigterm_before_the_first_step_saves_and_stops(tmp_path):
    # train.py catches SIGTERM from its first line: a signal while it imports, loads the model
    # (minutes at 7B), sets up or runs the long before-training evaluation (at 7B: 8 sets at 8k
    # tokens) must end in preempted.ckpt at step 0 and a clean stop before any step, never in
    # a killed process or a silent exit 0 with nothing saved. Sent as soon as the handler is in.
    run_dir = tmp_path / "early"
    proc = _train(run_dir, "max_steps=50", "callbacks.evaluation.before_training=true",
                  "callbacks.evaluation.max_problems=64", "callbacks.evaluation.k=8")
    try:
        deadline = time.monotonic() + 240
        while True:
            children = _children(proc.pid)
            if children and _python_catching_sigterm(children[0]):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no SIGTERM handler appeared (rc {proc.returncode})")
            time.sleep(0.05)
        for pid in _tree(children[0]):
            os.kill(pid, signal.SIGTERM)
    except BaseException:
        _finish(proc, timeout=1)
        raise
    out, err = _finish(proc)
    assert proc.returncode == 0, err[-3000:]
    match = RESUME_MESSAGE.search(out)
    assert match and match.group(1) == "SIGTERM" and int(match.group(3)) == 0, out + err[-2000:]
    checkpoint = _load(run_dir / "checkpoints" / "preempted.ckpt")
    assert checkpoint["relift"]["step_count"] == 0
    assert not list((run_dir / "checkpoints").glob("step-*.ckpt"))  # no step ran
    assert (run_dir / "summary.json").exists()


def test_signal_handlers_are_restored_after_a_failed_fit(tmp_path):
    # Lightning's teardown reinstalls the handler it found when it registered its own (ours):
    # after a fit that raised, SIGTERM would be swallowed and Ctrl-C need pressing twice.
    from relift_pl.train import build

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    trainer, module, datamodule = build(compose_cfg([*RUN, "max_steps=2"], output_dir=tmp_path))

    def fails(*args, **kwargs):
        raise RuntimeError("a failing step")

    module.training_step = fails
    with pytest.raises(RuntimeError, match="a failing step"):
        try:
            trainer.fit(module, datamodule=datamodule)
        finally:
            module.teardown("fit")
    assert {sig: signal.getsignal(sig) for sig in before} == before


class HandlerSeen(L.Callback):
    """Records the SIGTERM handler in force at train end, after the preemption callback's hook."""

    def __init__(self) -> None:
        self.at_train_end = None

    def on_train_end(self, trainer, module) -> None:
        self.at_train_end = signal.getsignal(signal.SIGTERM)


def test_no_sigterm_handler_but_the_preemption_callbacks_is_ever_in_force(tmp_path):
    # Lightning installs its own SIGTERM handler just before training (it kills the other ranks
    # and broadcasts from inside the handler); the final step's evaluation, saves and export
    # run in on_train_end hooks after the preemption callback's.
    from callbacks.preemption import PreemptionCheckpoint
    from relift_pl.train import build

    trainer, module, datamodule = build(compose_cfg([*RUN, "max_steps=1"], output_dir=tmp_path))
    preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
    seen, register = [], trainer._signal_connector.register_signal_handlers

    def register_and_look():
        register()
        seen.append(signal.getsignal(signal.SIGTERM))

    trainer._signal_connector.register_signal_handlers = register_and_look
    at_end = HandlerSeen()
    trainer.callbacks.append(at_end)
    before = signal.getsignal(signal.SIGTERM)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        module.teardown("fit")
    ours = preemption.latch._handle
    assert seen == [ours] and at_end.at_train_end == ours
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the run


def test_a_signal_before_the_trainer_exists_stops_the_run_before_its_first_step(tmp_path):
    # train.py catches SIGTERM from its first line: a signal while it imports, builds the model
    # or loads weights ends like one during setup (a step-0 preempted.ckpt, a clean stop).
    from relift_pl.signals import catch_from_start

    latch = catch_from_start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        result = fit(compose_cfg([*RUN, "max_steps=3"], output_dir=tmp_path))
    finally:
        latch.restore()
    assert result.module.preempted and result.module.step_count == 0
    assert _load(tmp_path / "checkpoints" / "preempted.ckpt")["relift"]["step_count"] == 0
