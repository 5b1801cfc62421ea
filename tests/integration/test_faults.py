"""Faults: non-finite gradients, broken checkpoints, a missing checkpoint, a failing rollout engine."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import compose_cfg
from relift_pl.rollout.base import RolloutBatch, RolloutEngine
from relift_pl.train import build, fit
from toy_overrides import QUICK_TOY

RUN = [
    *QUICK_TOY,
    "logger=csv",
    "callbacks.evaluation.before_training=false",
    "callbacks.evaluation.after_training=false",
    "callbacks.progress_bar=null",
    # Only the hardest level: every prompt's group fails, so an SFT step follows every RL step.
    "data.train_rows.levels=[4]",
]
NAN_STEP = 1  # module.step_count when the poisoned RL update runs (logged as training step 2)


class NaNGrads(L.Callback):
    """Makes the RL gradients of the given steps NaN (a hook on one parameter), and records the
    parameters before the rollout and after the RL update of every step."""

    def __init__(self, steps) -> None:
        self.steps = steps
        self.handle = None
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _params(module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.policy.named_parameters()}

    def on_before_rollout(self, trainer, module) -> None:
        self.before[module.step_count] = self._params(module)
        if module.step_count in self.steps:
            param = next(module.policy.parameters())
            self.handle = param.register_hook(lambda grad: grad * float("nan"))

    def on_rl_step_end(self, trainer, module, record) -> None:
        if self.handle is not None:  # SFT gradients stay finite
            self.handle.remove()
            self.handle = None
        self.after[module.step_count] = self._params(module)


def _fit_with(cfg, callback: L.Callback | None = None, engine: RolloutEngine | None = None):
    trainer, module, datamodule = build(cfg)
    if callback is not None:
        trainer.callbacks.insert(0, callback)
    if engine is not None:
        module._make_engine = lambda: engine
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        module.teardown("fit")  # stops the reward workers when fit raised
    return trainer, module


def _logged(out: Path) -> dict[int, dict[str, str]]:
    by_step: dict[int, dict[str, str]] = {}
    with open(next(out.rglob("metrics.csv"))) as handle:
        for row in csv.DictReader(handle):
            if row.get("step"):
                by_step.setdefault(int(float(row["step"])), {}).update(
                    {k: v for k, v in row.items() if v}
                )
    return by_step


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan")
    cfg = compose_cfg(
        [*RUN, "max_steps=3", "callbacks.checkpoint.every_n_train_steps=1"], output_dir=out
    )
    callback = NaNGrads(steps={NAN_STEP})
    _, module = _fit_with(cfg, callback)
    return module, callback, out


# -- non-finite gradients ---------------------------------------------------------------------
def test_nan_step_is_skipped_counted_and_logged(nan_run):
    module, callback, out = nan_run
    assert module.skipped_steps == 1
    # Nothing of the poisoned RL step reached the parameters...
    for name, value in callback.before[NAN_STEP].items():
        assert torch.equal(value, callback.after[NAN_STEP][name]), name
    # ...while a healthy RL step does change them.
    assert any(not torch.equal(v, callback.after[0][n]) for n, v in callback.before[0].items())
    rl_optimizer = module.optimizers()[0].optimizer
    assert {float(s["step"]) for s in rl_optimizer.state.values()} == {2.0}  # 3 RL steps, 1 skipped
    logged = _logged(out)
    assert [float(logged[s]["faults/skipped_steps"]) for s in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert logged[2]["rl/grad_norm"] == "nan"


def test_training_continues_after_a_skipped_step(nan_run):
    module, *_ = nan_run
    assert (module.step_count, module.rl_step) == (3, 3)
    assert module.sft_step == 3  # the SFT step of the poisoned training step ran normally
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_consecutive_non_finite_steps_abort_naming_the_step(tmp_path):
    # RL gradients NaN on every step; the SFT steps in between succeed and must not reset the count.
    cfg = compose_cfg(
        [*RUN, "max_steps=5", "algorithm.max_consecutive_skips=2"], output_dir=tmp_path
    )
    trainer, module, datamodule = build(cfg)
    trainer.callbacks.insert(0, NaNGrads(steps=range(100)))
    with pytest.raises(FloatingPointError) as err:
        trainer.fit(module, datamodule=datamodule)
    module.teardown("fit")
    message = str(err.value)
    assert message.startswith(
        "2 consecutive rl optimizer steps had a non-finite grad norm (last at training step 2); stopping."
    )
    assert "algorithm.max_consecutive_skips" in message
    assert module.sft_step == 1 and module.skipped_steps == 2


# -- checkpoints ------------------------------------------------------------------------------
def _copy_run(out: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    return run


def test_truncated_last_checkpoint_names_the_file_and_the_previous_one_resumes(nan_run, tmp_path):
    module, _, out = nan_run
    run = _copy_run(out, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"checkpoint {last} is truncated or corrupted") as err:
        fit(compose_cfg([*RUN, "max_steps=3", "ckpt_path=last"], output_dir=run))
    assert "resume from an earlier one with ckpt_path=<path>" in str(err.value)

    # The previous checkpoint (after step 2) still loads, and resuming from it reproduces step 3.
    previous = run / "checkpoints" / "step-000002.ckpt"
    resumed = fit(
        compose_cfg([*RUN, "max_steps=3", f"ckpt_path={previous}"], output_dir=tmp_path / "resumed")
    )
    assert (resumed.module.step_count, resumed.module.skipped_steps) == (3, 1)
    final = module.policy.state_dict()
    for name, value in resumed.module.policy.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_corrupted_checkpoint_names_the_file(nan_run, tmp_path):
    _, _, out = nan_run
    run = _copy_run(out, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])  # bit rot
    last.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"checkpoint {last} is (truncated or )?corrupted"):
        fit(compose_cfg([*RUN, "ckpt_path=last"], output_dir=run))


def test_ckpt_path_last_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        fit(compose_cfg([*RUN, "ckpt_path=last"], output_dir=tmp_path))
    assert str(err.value) == (
        f"ckpt_path=last but {tmp_path / 'checkpoints'} holds no preempted.ckpt or last.ckpt; run with "
        "the same output folder (hydra.run.dir=<the run's folder>) or give ckpt_path=<file>"
    )


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=f"checkpoint {missing} does not exist"):
        fit(compose_cfg([*RUN, f"ckpt_path={missing}"], output_dir=tmp_path))


# -- the rollout engine -----------------------------------------------------------------------
class BrokenEngine(RolloutEngine):
    def generate(self, prompt_ids, sampling):
        raise OSError("engine worker died")


class ShortEngine(RolloutEngine):
    """Returns one response whatever was asked (an engine that dropped requests)."""

    def generate(self, prompt_ids, sampling):
        ones = torch.ones(1, 2, dtype=torch.long)
        return RolloutBatch(ones, ones, ones, ones, ["stop"])


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        (
            BrokenEngine(),
            "rollout engine BrokenEngine at training step 1 (RL step 1), 4 prompts x n=4 "
            "failed: OSError: engine worker died",
        ),
        (
            ShortEngine(),
            "rollout engine ShortEngine at training step 1 (RL step 1), 4 prompts x n=4 "
            "returned 1 responses, expected 16",
        ),
    ],
    ids=["raises", "wrong-count"],
)
def test_rollout_engine_failure_is_a_clear_error(tmp_path, engine, message):
    cfg = compose_cfg([*RUN, "max_steps=2"], output_dir=tmp_path)
    with pytest.raises(RuntimeError) as err:
        _fit_with(cfg, engine=engine)
    assert str(err.value) == message


def test_a_sharded_folder_under_a_plain_trainer_is_one_line(tmp_path):
    from test_cli import run

    folder = tmp_path / "last.ckpt"  # what trainer=fsdp writes: a folder of shards
    folder.mkdir()
    done = run("train.py", f"ckpt_path={folder}", f"hydra.run.dir={tmp_path / 'out'}")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == (
        f"Error: checkpoint {folder} is a sharded (FSDP2) checkpoint folder, which only an FSDP2 "
        "trainer loads: resume it with trainer=fsdp (or the trainer config that wrote it)")
