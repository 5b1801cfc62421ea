"""Checkpoints hold what the run did: the final step, under the same names after a resume, the
best one chosen on a fresh evaluation, and the final policy as a Hugging Face model directory."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import compose_cfg
from relift_pl.train import build, fit
from tests_helpers import SigtermAt
from toy_overrides import QUICK_TOY

RUN = [
    *QUICK_TOY,
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.evaluation.before_training=false",
    "callbacks.evaluation.after_training=false",
]


def _trained_steps(out) -> list[int]:
    """The steps with a training row in the run's metrics.csv, in file order."""
    with open(out / "csv" / "metrics.csv", newline="") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/rl_step")]


def _step_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["relift"]["step_count"]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("three")
    result = fit(compose_cfg([*RUN, "max_steps=3", "callbacks.checkpoint.every_n_train_steps=2"],
                             output_dir=out))
    return result, out


def test_last_checkpoint_holds_the_final_step(three_steps):
    result, out = three_steps
    folder = out / "checkpoints"
    # Period 2 over 3 steps: step-2 on the period, and last.ckpt = step 3, the model the run ends with.
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step-000002.ckpt"]
    assert _step_of(folder / "last.ckpt") == 3 == result.module.step_count
    assert _step_of(folder / "step-000002.ckpt") == 2


def test_final_model_is_the_trained_policy_with_its_tokenizer(three_steps):
    result, out = three_steps
    final = out / "final_model"
    model = AutoModelForCausalLM.from_pretrained(final)
    trained = result.module.policy.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name  # toy base: float32 in, float32 out
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template == result.module.tokenizer.chat_template
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] is not None
    assert not list(out.glob("final_model.tmp*")) and not (out / "final_model.old").exists()


def test_resume_keeps_writing_last_and_a_finished_run_does_not_train_on(tmp_path):
    out = tmp_path / "run"
    fit(compose_cfg([*RUN, "max_steps=2", "callbacks.checkpoint.every_n_train_steps=1"], output_dir=out))
    resumed = fit(compose_cfg(
        [*RUN, "max_steps=4", "callbacks.checkpoint.every_n_train_steps=1", "ckpt_path=last"],
        output_dir=out,
    ))  # fmt: skip
    folder = out / "checkpoints"
    assert resumed.module.step_count == 4
    assert not list(folder.glob("last-v*")), sorted(p.name for p in folder.iterdir())
    assert _step_of(folder / "last.ckpt") == 4
    # metrics.csv continues across the resume: every step once (Lightning's CSVLogger erased 1-2).
    assert _trained_steps(out) == [1, 2, 3, 4]
    # Resumed again with the same max_steps (a requeue of a finished job): no step, no rewrite.
    before = (folder / "last.ckpt").stat().st_mtime_ns
    again = fit(compose_cfg(
        [*RUN, "max_steps=4", "callbacks.checkpoint.every_n_train_steps=1", "ckpt_path=last"],
        output_dir=out,
    ))  # fmt: skip
    assert again.module.step_count == 4 and again.module.rl_step == resumed.module.rl_step
    assert (folder / "last.ckpt").stat().st_mtime_ns == before


def test_best_checkpoint_is_chosen_on_a_fresh_evaluation(tmp_path):
    # Checkpoints every 2 steps, evaluations every 4: step 2 has only the step-0 score, which
    # must not make it "best". Top-k checkpoints are considered where evaluations happened.
    out = tmp_path / "run"
    result = fit(compose_cfg([
        *RUN, "max_steps=6", "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.evaluation.every_n_steps=4", "callbacks.evaluation.before_training=true",
        "callbacks.evaluation.after_training=true",
        "callbacks.checkpoint.monitor=val/avg", "callbacks.checkpoint.save_top_k=1",
        "callbacks.checkpoint.filename='best-{step:.0f}'",
    ], output_dir=out))  # fmt: skip
    callback = result.trainer.checkpoint_callback
    evaluated = {step: values["val/avg"] for step, values in
                 next(c for c in result.trainer.callbacks if hasattr(c, "history")).history}
    assert sorted(evaluated) == [0, 4, 6]
    best_step = _step_of(callback.best_model_path)
    assert best_step in (4, 6)
    assert float(callback.best_model_score) == pytest.approx(max(evaluated[4], evaluated[6]))
    assert _step_of(out / "checkpoints" / "last.ckpt") == 6
    # The best policy is exported next to the final one.
    assert (out / "best_model" / "model.safetensors").exists()
    assert (out / "final_model" / "model.safetensors").exists()


def test_a_run_preempted_in_its_last_step_is_finished_by_its_resume(tmp_path):
    out = tmp_path / "run"
    cfg = compose_cfg([*RUN, "max_steps=2", "callbacks.checkpoint.every_n_train_steps=1"], output_dir=out)
    trainer, module, datamodule = build(cfg)
    trainer.callbacks.append(SigtermAt(2))
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        module.teardown("fit")
    folder = out / "checkpoints"
    assert module.preempted and _step_of(folder / "preempted.ckpt") == 2
    assert _step_of(folder / "last.ckpt") == 1 and not (out / "final_model").exists()
    # The requeued job resumes at its last step: no step to take, but the final saves happen.
    again = fit(compose_cfg([*RUN, "max_steps=2", "callbacks.checkpoint.every_n_train_steps=1",
                             "callbacks.evaluation.after_training=true", "ckpt_path=last"], output_dir=out))
    assert again.module.step_count == 2 and again.module.rl_step == 2
    assert _step_of(folder / "last.ckpt") == 2
    # Named by the training step, not by Lightning's global_step (RL + SFT optimizer steps).
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-000001.ckpt", "step-000002.ckpt"]
    assert _step_of(folder / "step-000002.ckpt") == 2
    assert (out / "final_model" / "model.safetensors").exists()
    assert _trained_steps(out) == [1, 2]  # the resume logs only an evaluation: step 2's row stays


def test_linking_last_to_a_top_k_file_is_refused():
    from relift_pl.checkpoint import TrainingStepCheckpoint

    with pytest.raises(ValueError, match="save_last=link is not supported"):
        TrainingStepCheckpoint(dirpath="/tmp/unused", save_last="link")


EVAL_EVERY_2 = [
    *RUN, "max_steps=4", "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.evaluation.every_n_steps=2", "callbacks.evaluation.after_training=true",
    "callbacks.checkpoint.monitor=val/avg", "callbacks.checkpoint.save_top_k=1",
    "callbacks.checkpoint.filename='best-{step:.0f}'", "callbacks.checkpoint.export_hf=false",
    "reward._target_=stub_rewards.HashReward",  # scores that are not all 0
]


def _evaluations(out) -> dict[int, float]:
    """step -> val/avg, from the run's metrics.csv."""
    with open(out / "csv" / "metrics.csv", newline="") as f:
        return {int(float(r["step"])): float(r["val/avg"]) for r in csv.DictReader(f) if r.get("val/avg")}


def _per_problem(out) -> list[dict]:
    """Every evaluation's per-problem lines (scores and response lengths), in step order."""
    lines = [json.loads(line) for line in (out / "eval" / "per_problem.jsonl").read_text().splitlines()]
    return sorted(lines, key=lambda line: (line["step"], line["set"]))


@pytest.fixture(scope="module")
def evaluated_every_2(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight_eval")
    result = fit(compose_cfg(EVAL_EVERY_2, output_dir=out))
    return result, out


@pytest.mark.parametrize("in_evaluation", [False, True], ids=["step", "evaluation"])
def test_a_preemption_at_an_evaluation_step_is_evaluated_by_the_resume(evaluated_every_2, tmp_path, in_evaluation):
    straight, straight_out = evaluated_every_2
    out = tmp_path / "run"
    trainer, module, datamodule = build(compose_cfg(EVAL_EVERY_2, output_dir=out))
    trainer.callbacks.append(SigtermAt(2, in_evaluation))
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        module.teardown("fit")
    assert module.preempted and _step_of(out / "checkpoints" / "preempted.ckpt") == 2
    resumed = fit(compose_cfg([*EVAL_EVERY_2, "ckpt_path=last"], output_dir=out))
    # The interrupted evaluation of step 2 runs first: the straight run's scores and per-problem
    # lines (response lengths included), and its candidacy for the best checkpoint.
    assert sorted(_evaluations(out)) == [2, 4]
    assert _evaluations(out) == _evaluations(straight_out)
    assert _per_problem(out) == _per_problem(straight_out)
    best, straight_best = resumed.trainer.checkpoint_callback, straight.trainer.checkpoint_callback
    assert float(best.best_model_score) == float(straight_best.best_model_score)
    assert _step_of(best.best_model_path) == _step_of(straight_best.best_model_path)
    # ... written by the resume before its first step: the random streams that step starts from.
    ours, theirs = (torch.load(c.best_model_path, weights_only=False)["relift"]["rng"] for c in (best, straight_best))
    assert torch.equal(ours[0]["torch"], theirs[0]["torch"]) and ours[0]["python"] == theirs[0]["python"]
    # The same checkpoint files as the straight run's (and preempted.ckpt).
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == sorted([*(p.name for p in (straight_out / "checkpoints").iterdir()), "preempted.ckpt"])


# -- what a resume keeps: logged rows, per-problem lines, the best so far -------------------------
class _RowsOnDiskWhenPreempted(L.Callback):
    """The training steps metrics.csv holds on disk right after preempted.ckpt is written."""

    def __init__(self, out) -> None:
        self.out, self.steps = out, None

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if module.preempted and self.steps is None:
            self.steps = _trained_steps(self.out) if (self.out / "csv" / "metrics.csv").exists() else []


def test_preempted_checkpoint_finds_its_steps_rows_on_disk(tmp_path):
    # A scheduler's kill right after the save (the end of its grace time) must not lose rows
    # the checkpoint holds: the resume would log only the steps after it.
    out = tmp_path / "run"
    trainer, module, datamodule = build(compose_cfg([*RUN, "max_steps=4", "callbacks.checkpoint.every_n_train_steps=0"],
                                                    output_dir=out))
    seen = _RowsOnDiskWhenPreempted(out)
    trainer.callbacks += [SigtermAt(3), seen]
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        module.teardown("fit")
    assert module.preempted and seen.steps == [1, 2, 3]


class _CrashAt(L.Callback):
    """Fails at the end of training step ``step``, after its evaluation, before its checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if module.step_count == self.step:
            raise RuntimeError("crashed")


def test_a_resume_from_an_earlier_checkpoint_drops_later_evaluations_lines(tmp_path):
    run = [*EVAL_EVERY_2, "callbacks.evaluation.every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=2"]
    fit(compose_cfg(run, output_dir=tmp_path / "straight"))
    out = tmp_path / "run"
    trainer, module, datamodule = build(compose_cfg(run, output_dir=out))
    trainer.callbacks.append(_CrashAt(3))
    with pytest.raises(RuntimeError, match="crashed"):
        try:
            trainer.fit(module, datamodule=datamodule)
        finally:
            module.teardown("fit")
    assert {line["step"] for line in _per_problem(out)} == {1, 2, 3}
    fit(compose_cfg([*run, "ckpt_path=last"], output_dir=out))  # last.ckpt: step 2
    assert _per_problem(out) == _per_problem(tmp_path / "straight")  # step 3 once, as evaluated again


# mode=min: step 2 (val/avg 0.22) is the best checkpoint, step 4 (0.28) is not.
BEST_AT_2 = [*EVAL_EVERY_2, "callbacks.checkpoint.mode=min"]


def test_a_resume_into_a_new_folder_ranks_against_the_best_so_far(tmp_path):
    straight = fit(compose_cfg(BEST_AT_2, output_dir=tmp_path / "straight")).trainer.checkpoint_callback
    assert _step_of(straight.best_model_path) == 2
    fit(compose_cfg([*BEST_AT_2, "max_steps=2"], output_dir=tmp_path / "first"))
    first = tmp_path / "first" / "checkpoints"
    # docs/resuming.md's first command: ckpt_path=<file>, a new run folder.
    resumed = fit(compose_cfg([*BEST_AT_2, f"ckpt_path={first / 'last.ckpt'}"], output_dir=tmp_path / "second"))
    callback = resumed.trainer.checkpoint_callback
    assert float(callback.best_model_score) == float(straight.best_model_score)
    assert callback.best_model_path == str(first / "best-2.ckpt") and (first / "best-2.ckpt").exists()
    assert not list((tmp_path / "second" / "checkpoints").glob("best-*"))


def test_a_resume_with_another_checkpoint_period_keeps_the_best_so_far(tmp_path, recwarn):
    out = tmp_path / "run"
    fit(compose_cfg([*BEST_AT_2, "max_steps=2"], output_dir=out))
    resumed = fit(compose_cfg([*BEST_AT_2, "callbacks.checkpoint.every_n_train_steps=2", "ckpt_path=last"],
                              output_dir=out))
    assert _step_of(resumed.trainer.checkpoint_callback.best_model_path) == 2
    assert sorted(p.name for p in (out / "checkpoints").glob("best-*")) == ["best-2.ckpt"]
    # ... and Lightning does not ask for "the callbacks used to create the checkpoint".
    assert not [w for w in recwarn if "callbacks used to create the checkpoint" in str(w.message)]


def test_a_preempted_step_is_saved_by_a_resume_that_ranks_otherwise(tmp_path):
    # Another monitor or mode starts the ranking afresh, but the preempted step's saves still
    # happen first (which step's saves were done does not depend on the ranking).
    out = tmp_path / "run"
    run = [*RUN, "max_steps=3", "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.save_top_k=-1"]
    trainer, module, datamodule = build(compose_cfg(run, output_dir=out))
    trainer.callbacks.append(SigtermAt(2))
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        module.teardown("fit")
    assert module.preempted and sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001.ckpt"]
    fit(compose_cfg([*run, "callbacks.checkpoint.mode=min", "ckpt_path=last"], output_dir=out))
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-000001.ckpt", "step-000002.ckpt", "step-000003.ckpt"]
