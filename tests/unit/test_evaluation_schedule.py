"""When BenchmarkEvaluation evaluates: the final step inside the step (where checkpoint callbacks
see it), the on_train_end fallback, never twice for one step, never after a preemption; and its
``last_eval_step`` through a checkpoint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from stub_rewards import HashReward
from test_evaluation_scoring import SCRIPT, ScriptedModule, rows

from callbacks.evaluation import BenchmarkEvaluation

EVAL_SETS = {"math": rows("\\frac{1}{2}", "3")}


@pytest.fixture
def trainer():
    return SimpleNamespace(
        loggers=[], callback_metrics={}, is_global_zero=True,
        datamodule=SimpleNamespace(eval_sets=EVAL_SETS),
    )  # fmt: skip


def steps(evaluation, trainer, module, last_step: int) -> None:
    """Training steps 1..last_step as the callbacks see them."""
    for step in range(1, last_step + 1):
        module.step_count = step
        evaluation.on_train_batch_end(trainer, module)


def evaluated_steps(evaluation) -> list[int]:
    return [step for step, _ in evaluation.history]


def test_final_step_is_evaluated_inside_the_step_once(trainer):
    module = ScriptedModule(SCRIPT, HashReward())  # max_steps=2
    evaluation = BenchmarkEvaluation(k=2)
    evaluation.on_train_start(trainer, module)
    steps(evaluation, trainer, module, 2)
    assert evaluated_steps(evaluation) == [0, 2]
    assert trainer.callback_metrics["val/avg"] == evaluation.history[-1][1]["val/avg"]
    assert evaluation.last_eval_step == 2
    evaluation.on_train_end(trainer, module)
    assert evaluated_steps(evaluation) == [0, 2]  # not twice for step 2


def test_periodic_evaluation_on_the_last_step_counts_as_the_final_one(trainer):
    module = ScriptedModule(SCRIPT, HashReward())
    evaluation = BenchmarkEvaluation(k=2, every_n_steps=1, before_training=False)
    steps(evaluation, trainer, module, 2)
    evaluation.on_train_end(trainer, module)
    assert evaluated_steps(evaluation) == [1, 2]


def test_a_run_stopped_early_is_evaluated_at_its_end(trainer):
    module = ScriptedModule(SCRIPT, HashReward())
    evaluation = BenchmarkEvaluation(k=2, before_training=False)
    steps(evaluation, trainer, module, 1)  # stopped after step 1 of 2 (not a preemption)
    assert evaluation.last_eval_step == -1
    evaluation.on_train_end(trainer, module)
    assert evaluated_steps(evaluation) == [1]


def test_a_preempted_run_is_not_evaluated_at_its_end(trainer):
    module = ScriptedModule(SCRIPT, HashReward())
    evaluation = BenchmarkEvaluation(k=2, before_training=False)
    steps(evaluation, trainer, module, 1)
    module.preempted = True
    evaluation.on_train_end(trainer, module)
    assert evaluated_steps(evaluation) == []


def test_a_step_the_run_was_preempted_at_is_not_evaluated(trainer):
    # The preemption callback runs first and has saved preempted.ckpt: the run must leave now.
    module = ScriptedModule(SCRIPT, HashReward())
    evaluation = BenchmarkEvaluation(k=2, every_n_steps=1, before_training=False)
    steps(evaluation, trainer, module, 1)
    module.preempted = True
    module.step_count = 2  # the last step, and a periodic one
    evaluation.on_train_batch_end(trainer, module)
    evaluation.on_train_end(trainer, module)
    assert evaluated_steps(evaluation) == [1]


@pytest.mark.parametrize(("resumed_at", "evaluated"), [(2, [2]), (3, []), (5, [5])])
def test_a_resume_first_evaluates_the_step_its_checkpoint_did_not(trainer, resumed_at, evaluated):
    # Every 2 steps and the last (5): a checkpoint of step 2 or 5 written before that step's
    # evaluation (a preemption) is evaluated first; step 3 is not due.
    module = ScriptedModule(SCRIPT, HashReward())
    module.max_steps = 5
    evaluation = BenchmarkEvaluation(k=2, every_n_steps=2)
    evaluation.load_state_dict({"history": [(0, {"val/avg": 0.5})], "last_eval_step": 0})
    module.step_count = resumed_at
    evaluation.on_train_start(trainer, module)
    assert evaluated_steps(evaluation) == [0, *evaluated]
    evaluation.on_train_start(trainer, module)  # from a checkpoint written after it: not again
    assert evaluated_steps(evaluation) == [0, *evaluated]


def test_after_training_false_skips_the_final_evaluation(trainer):
    module = ScriptedModule(SCRIPT, HashReward())
    evaluation = BenchmarkEvaluation(k=2, before_training=False, after_training=False)
    steps(evaluation, trainer, module, 2)
    evaluation.on_train_end(trainer, module)
    assert evaluated_steps(evaluation) == []


def test_last_eval_step_travels_in_the_state_and_old_states_still_load(trainer):
    module = ScriptedModule(SCRIPT, HashReward())
    evaluation = BenchmarkEvaluation(k=2, every_n_steps=1)
    steps(evaluation, trainer, module, 1)
    state = evaluation.state_dict()
    assert state["last_eval_step"] == 1
    resumed = BenchmarkEvaluation(k=2)
    resumed.load_state_dict(state)
    assert (resumed.last_eval_step, evaluated_steps(resumed)) == (1, [1])
    old = BenchmarkEvaluation(k=2)
    old.load_state_dict({"history": state["history"]})  # a checkpoint from before the field
    assert old.last_eval_step == 1
    empty = BenchmarkEvaluation(k=2)
    empty.load_state_dict({"history": []})
    assert empty.last_eval_step == -1


def test_a_preemption_signal_stops_an_evaluation_between_generate_calls(trainer, tmp_path):
    import signal

    from callbacks.preemption import PreemptionCheckpoint

    preemption = PreemptionCheckpoint(str(tmp_path))
    trainer.callbacks = [preemption]
    module = ScriptedModule(SCRIPT, HashReward())
    evaluation = BenchmarkEvaluation(k=2, batch_prompts=1)  # one generate call per problem
    calls = []
    generate = module.generate

    def counted(*args, **kwargs):
        calls.append(1)
        preemption.latch.received = signal.SIGTERM  # the signal lands during the first call
        return generate(*args, **kwargs)

    module.generate = counted
    saved = []
    trainer.save_checkpoint = lambda path, weights_only: saved.append(path)
    assert evaluation.run(trainer, module) == {}
    assert len(calls) == 1 and evaluation.history == [] and "val/avg" not in trainer.callback_metrics
    # preempted.ckpt at once, before the step's other saves: the resumed run evaluates first.
    assert saved == [tmp_path / "preempted.ckpt"] and module.preempted and trainer.should_stop
