"""``evaluate(run_dir=...)`` scores a train.py run as its final evaluation did, and the run summary
names its evaluations honestly: no "before" without a step-0 evaluation, a preempted run said so.

The training run is a real ``python train.py`` (it writes ``.hydra/config.yaml``), on the quick toy
base with the deterministic stub reward.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_evaluate import STUB_REWARD, compose_eval

from callbacks.preemption import PreemptionCheckpoint
from conftest import compose_cfg
from relift_pl.config import ConfigError
from relift_pl.evaluate import evaluate
from relift_pl.train import fit
from toy_overrides import QUICK_TOY

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 4
RUN = [
    *QUICK_TOY, STUB_REWARD, "logger=csv", "callbacks.progress_bar=null", f"max_steps={MAX_STEPS}",
    # Evaluations at steps 3 and 4 (the last step); none at step 0.
    "callbacks.evaluation.before_training=false", "callbacks.evaluation.every_n_steps=3",
    # One checkpoint, at the last step, keeping the best val/avg.
    f"callbacks.checkpoint.every_n_train_steps={MAX_STEPS}", "callbacks.checkpoint.monitor=val/avg",
    "callbacks.checkpoint.save_top_k=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    done = subprocess.run(
        ["timeout", "-k", "10", "600", sys.executable, "train.py", *RUN, f"hydra.run.dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def evaluation_state(checkpoint: Path) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["callbacks"]
    return next(v for k, v in state.items() if k.startswith("BenchmarkEvaluation"))


def test_summary_has_no_before_without_a_step_0_evaluation(run_dir):
    summary = summary_of(run_dir)
    assert summary["before"] is None  # not the step-3 evaluation
    assert (summary["after_step"], summary["steps"]) == (MAX_STEPS, MAX_STEPS)
    assert summary["preempted"] is False
    assert set(summary["after"]) >= {"val/avg", "val/level1/avg@2", "val/reward_timeouts"}


def test_the_last_steps_checkpoint_sees_its_evaluation(run_dir):
    (best,) = (run_dir / "checkpoints").glob("step-*.ckpt")
    state = evaluation_state(best)
    assert state["last_eval_step"] == MAX_STEPS
    assert [step for step, _ in state["history"]] == [3, MAX_STEPS]
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)["callbacks"]
    monitor = next(v for k, v in checkpoint.items() if k.startswith("TrainingStepCheckpoint"))
    assert float(monitor["current_score"]) == summary_of(run_dir)["after"]["val/avg"]


def test_evaluate_run_dir_reproduces_the_final_evaluation(run_dir, tmp_path):
    # The stub reward is a test class: a saved config may not name it, the command line may.
    overrides = [f"run_dir={run_dir}", STUB_REWARD]
    evaluated = evaluate(compose_eval(overrides, tmp_path), overrides)
    assert evaluated.metrics == summary_of(run_dir)["after"]  # exactly: same weights, seed, k
    assert [s.num_problems for s in evaluated.scores] == [4, 4, 4, 4]  # the run's max_problems
    with open(tmp_path / "csv" / "metrics.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == [str(MAX_STEPS)]
    assert f"- run: {run_dir}\n" in (tmp_path / "results.md").read_text()
    # The run's last checkpoint in the run's own model config scores the same.
    last = run_dir / "checkpoints" / "last.ckpt"
    overrides = [f"run_dir={run_dir}", STUB_REWARD, f"ckpt_path={last}"]
    from_checkpoint = evaluate(compose_eval(overrides, tmp_path / "ckpt"), overrides)
    assert from_checkpoint.metrics == summary_of(run_dir)["after"]


def test_a_checkpoint_in_a_run_folder_is_scored_with_that_runs_settings(run_dir, tmp_path, capsys):
    # Not evaluate.yaml's (MATH train's benchmarks, temperature 0.6, 1,024 new tokens): the run's.
    last = run_dir / "checkpoints" / "last.ckpt"
    overrides = [f"ckpt_path={last}", STUB_REWARD]
    evaluated = evaluate(compose_eval(overrides, tmp_path), overrides)
    assert evaluated.metrics == summary_of(run_dir)["after"]  # its final evaluation, exactly
    said = f"settings: the run's {run_dir / '.hydra' / 'config.yaml'}, with this command line's overrides on top"
    assert said in capsys.readouterr().out
    results = (tmp_path / "results.md").read_text()
    assert f"- run: {run_dir}\n" in results and f"- model: {last}\n" in results
    # A global group would replace the run's settings wholesale: refused, naming the run.
    overrides = [f"ckpt_path={last}", STUB_REWARD, "experiment=toy"]
    with pytest.raises(ConfigError, match=rf"run_dir={run_dir}: the override experiment=toy sets keys across"):
        evaluate(compose_eval(overrides, tmp_path / "global"), overrides)


def test_evaluate_run_dir_applies_explicit_overrides(run_dir, tmp_path):
    overrides = [f"run_dir={run_dir}", STUB_REWARD, "callbacks.evaluation.max_problems=2",
                 "callbacks.evaluation.k_per_set={level1:3}"]  # fmt: skip
    evaluated = evaluate(compose_eval(overrides, tmp_path), overrides)
    assert [(s.name, s.num_problems, s.k) for s in evaluated.scores] == [
        ("level1", 2, 3), ("level2", 2, 2), ("level3", 2, 2), ("level4", 2, 2)]
    assert "- k: level1=3, level2=2, level3=2, level4=2\n" in (tmp_path / "results.md").read_text()


def test_evaluate_run_dir_refuses_a_folder_without_a_saved_config(tmp_path):
    cfg = compose_eval([f"run_dir={tmp_path}"], tmp_path / "eval")
    with pytest.raises(ConfigError, match="has no .hydra/config.yaml"):
        evaluate(cfg, [f"run_dir={tmp_path}"])


def test_a_preempted_run_says_so_and_evaluate_scores_its_checkpoint(tmp_path, monkeypatch):
    start = PreemptionCheckpoint.on_train_batch_start

    def signal_during_step_1(self, trainer, module, *args):
        start(self, trainer, module, *args)
        if module.step_count == 0:
            self.latch.received = signal.SIGTERM  # as if the scheduler sent it during the first step

    monkeypatch.setattr(PreemptionCheckpoint, "on_train_batch_start", signal_during_step_1)
    out = tmp_path / "run"
    cfg = compose_cfg([*QUICK_TOY, STUB_REWARD, "logger=csv", "callbacks.progress_bar=null",
                       "max_steps=3"], output_dir=out)  # fmt: skip
    result = fit(cfg)
    summary = summary_of(out)
    assert (summary["preempted"], summary["steps"]) == (True, 1)
    assert summary["after"] is None and summary["after_step"] is None  # never "after" = "before"
    assert summary["before"] is not None
    assert [step for step, _ in next(c for c in result.trainer.callbacks
                                     if type(c).__name__ == "BenchmarkEvaluation").history] == [0]
    # evaluate.py finds the run's preempted.ckpt (train.py writes the config; here by hand).
    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    overrides = [f"run_dir={out}", STUB_REWARD]
    evaluated = evaluate(compose_eval(overrides, tmp_path / "eval"), overrides)
    assert "preempted.ckpt" in (tmp_path / "eval" / "results.md").read_text()
    assert 0 <= evaluated.metrics["val/avg"] <= 1


def test_a_checkpoint_newer_than_final_model_is_scored_instead(tmp_path):
    # A finished run resumed past its final_model/ and stopped: the newer checkpoint holds it.
    from relift_pl.evaluate import run_config

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_cfg([], output_dir=run), run / ".hydra" / "config.yaml")
    (run / "final_model").mkdir()
    (run / "checkpoints").mkdir()
    checkpoint = run / "checkpoints" / "preempted.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    os.utime(run / "final_model", (1, 1))  # older than the checkpoint
    cfg = compose_eval([f"run_dir={run}"], tmp_path / "eval")
    assert run_config(cfg, overrides=[f"run_dir={run}"]).ckpt_path == str(checkpoint)
    os.utime(checkpoint, (0, 0))  # now final_model/ is the newer one
    picked = run_config(cfg, overrides=[f"run_dir={run}"])
    assert picked.model.name_or_path == str(run / "final_model") and picked.get("ckpt_path") is None
