"""Benchmark evaluation end to end on the tiny toy model: the callback during a CPU training run
(val/... tags, best checkpoint by val/avg) and evaluate.py on its checkpoint and on a saved model.

The reward is a deterministic stand-in (tests/stub_rewards.py) so scores are not all zero and the
numbers can be followed from the scoring to the logs and the results files.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONF, compose_cfg
from relift_pl.evaluate import evaluate
from relift_pl.train import fit
from toy_overrides import QUICK_TOY

STUB_REWARD = "reward._target_=stub_rewards.HashReward"
SETS = ["level1", "level2", "level3", "level4"]


def compose_eval(overrides: list[str], output_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("evaluate", overrides=[f"paths.output_dir={output_dir}", *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_cfg([
        *QUICK_TOY, STUB_REWARD, "max_steps=2",
        "callbacks.evaluation.every_n_steps=1",
        "++callbacks.checkpoint.monitor=val/avg", "++callbacks.checkpoint.mode=max",
        "callbacks.checkpoint.save_top_k=1", "callbacks.checkpoint.every_n_train_steps=1",
    ], output_dir=out)
    return fit(cfg), out, cfg


def evaluation_of(result):
    return next(c for c in result.trainer.callbacks if type(c).__name__ == "BenchmarkEvaluation")


def test_callback_logs_val_tags_before_and_every_step(run):
    result, out, _ = run
    history = evaluation_of(result).history
    assert [step for step, _ in history] == [0, 1, 2]  # before training, then every step
    logged: dict[str, dict[int, float]] = {}
    for path in Path(out).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("val/"):
                logged.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    expected_tags = {f"val/{s}/{m}@2" for s in SETS for m in ("avg", "pass")} | {
        "val/avg", "val/reward_timeouts", "val/reward_failures"}
    assert set(logged) == expected_tags
    for step, metrics in history:
        for tag, value in metrics.items():
            assert logged[tag][step] == pytest.approx(value)
    assert any(0 < v < 1 for v in history[-1][1].values())  # the stub makes scores non-trivial


def test_best_checkpoint_follows_val_avg(run):
    result, _, _ = run
    checkpoint = result.trainer.checkpoint_callback
    scored = {step: metrics["val/avg"] for step, metrics in evaluation_of(result).history if step}
    best_step = max(scored, key=scored.get)
    assert float(checkpoint.best_model_score) == pytest.approx(scored[best_step])
    saved = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    assert saved["relift"]["step_count"] == best_step


def read_results(out: Path) -> tuple[dict[str, list[str]], dict[str, float], str]:
    """(results.csv rows by benchmark, last logged val/... values, results.md text)."""
    with open(out / "results.csv") as f:
        table = {row[0]: row[1:] for row in list(csv.reader(f))[1:]}
    with open(out / "csv" / "metrics.csv") as f:
        logged_row = list(csv.DictReader(f))[-1]
    logged = {k: float(v) for k, v in logged_row.items() if k.startswith("val/") and v}
    return table, logged, (out / "results.md").read_text()


def assert_results_match_logs(out: Path, result) -> None:
    assert all((out / f"results.{ext}").stat().st_size > 0 for ext in ("md", "csv", "png"))
    table, logged, markdown = read_results(out)
    assert list(table) == [*SETS, "average"]
    for name in SETS:
        avg, pas, problems, k = table[name]
        assert float(avg) == logged[f"val/{name}/avg@2"] == result.metrics[f"val/{name}/avg@2"]
        assert float(pas) == logged[f"val/{name}/pass@2"]
        assert (problems, k) == ("4", "2")  # callbacks.evaluation.max_problems=4, k=2
        row = re.search(rf"^\| {name} \| 2 \| ([\d.]+) \| ([\d.]+) \| 4 \|$", markdown, re.M)
        assert row, markdown
        assert row.groups() == (f"{100 * float(avg):.1f}", f"{100 * float(pas):.1f}")
    assert float(table["average"][0]) == pytest.approx(logged["val/avg"])


EVAL_OVERRIDES = [*QUICK_TOY, STUB_REWARD, "data=toy", "experiment=toy"]


def test_evaluate_checkpoint_reproduces_the_last_training_evaluation(run, tmp_path):
    result, out, _ = run
    ckpt = Path(out) / "checkpoints" / "last.ckpt"
    cfg = compose_eval([*EVAL_OVERRIDES, f"ckpt_path={ckpt}"], tmp_path)
    evaluated = evaluate(cfg)
    assert_results_match_logs(tmp_path, evaluated)
    step, last = evaluation_of(result).history[-1]
    # Same weights, seed and settings as the run's last evaluation: the same numbers, same step.
    assert evaluated.metrics == pytest.approx(last)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == [str(step)]  # logged at the ckpt's step


def test_evaluate_saved_model_directory(run, tmp_path):
    _, _, train_cfg = run
    model_dir = instantiate(train_cfg.model.build)()  # the cached toy base: a saved HF model
    overrides = [o for o in EVAL_OVERRIDES if not o.startswith("model.build")]
    cfg = compose_eval([*overrides, "model=pretrained", f"model.name_or_path={model_dir}"], tmp_path)
    assert_results_match_logs(tmp_path, evaluate(cfg))
    assert f"model: {model_dir}" in (tmp_path / "results.md").read_text()


def test_evaluate_refuses_an_ambiguous_model(tmp_path):
    cfg = compose_eval(["model.name_or_path=/some/dir"], tmp_path)  # model=tiny also builds one
    with pytest.raises(ValueError, match="model=pretrained model.name_or_path"):
        evaluate(cfg)
