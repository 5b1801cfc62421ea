"""train.py / evaluate.py as users run them (subprocesses, stdout to a pipe as in a log file):
one-line config errors, the run directory, plain progress lines, quiet output, resume file names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toy_overrides import QUICK_TOY

ROOT = Path(__file__).resolve().parents[2]
NOISE = ("Traceback", "litlogger", "LeafSpec", "exists and is not empty", "Token indices")


def run(script: str, *overrides: str, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(
        ["timeout", "-k", "10", "600", sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )


@pytest.mark.parametrize(
    ("script", "overrides", "message"),
    [
        (
            "train.py", ["+max_step=5"],
            "max_step is not a top-level key of conf/train.yaml; did you mean max_steps? Remove it "
            "or fix its spelling.",
        ),
        (
            "evaluate.py", ["+ckpt=x.ckpt"],
            "ckpt is not a top-level key of conf/evaluate.yaml; did you mean ckpt_path? Remove it "
            "or fix its spelling.",
        ),
        (  # without the +: Hydra's own message said "To append to your config use +max_step=5"
            "train.py", ["max_step=5"],
            "max_step is not a top-level key of conf/train.yaml; did you mean max_steps? Remove it "
            "or fix its spelling.",
        ),
        (
            "evaluate.py", ["ckpt=x.ckpt"],
            "ckpt is not a top-level key of conf/evaluate.yaml; did you mean ckpt_path? Remove it "
            "or fix its spelling.",
        ),
        (
            "train.py", ["callbacks.evaluaton.k=3"],
            "callbacks.evaluaton is not a key of callbacks; did you mean evaluation? Remove it or "
            "fix its spelling.",
        ),
        (
            "train.py", ["algorithm.group_size=1"],
            "algorithm.group_size must be >= 2 (GRPO compares samples within a group), got 1",
        ),
        (  # the key the user set, not algorithm.buffer_threshold (${data.batch_size}) it feeds
            "train.py", ["data.batch_size=-3"], "data.batch_size must be >= 1, got -3",
        ),
        (  # raised inside a config resolver (OmegaConf wraps it): printed as one line too
            "train.py", ["experiment=paper_rehearsal", "paths.data_dir=/nonexistent"],
            "/nonexistent/train/math_train.jsonl does not exist: the OpenR1-schema sample is drawn "
            "from the math training set under paths.data_dir; set paths.data_dir=<a folder holding "
            "train/ and benchmarks/> (or RELIFT_DATA_DIR)",
        ),
    ],
)
def test_config_error_is_one_line_without_traceback(script, overrides, message, tmp_path):
    run_dir = tmp_path / "run"
    done = run(script, *overrides, f"hydra.run.dir={run_dir}")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"Error: {message}"
    assert "Traceback" not in done.stderr
    assert "Loading weights" not in done.stderr + done.stdout  # failed before any model loaded
    # A run that never started announces no run directory and leaves no folder (nor train.log).
    assert "run directory" not in done.stdout
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def test_hydra_full_error_shows_the_traceback(tmp_path):
    done = run("train.py", "algorithm.group_size=1", f"hydra.run.dir={tmp_path}", full_error=True)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ConfigError: algorithm.group_size must be >= 2" in done.stderr


def test_run_dir_progress_lines_quiet_output_and_resume_names(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        *QUICK_TOY, "callbacks.evaluation.before_training=false", f"hydra.run.dir={run_dir}",
        "callbacks.checkpoint.every_n_train_steps=2", "callbacks.progress_bar.text_every_n_steps=2",
    ]
    first = run("train.py", *overrides, "max_steps=4")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == f"run directory: {run_dir}"
    assert lines[-1] == f"outputs (checkpoints, logs, summary.json) are in {run_dir}"
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in progress] == ["step 2/4", "step 4/4"]
    assert " s/step | ETA " in progress[0] and " | reward " in progress[0]
    assert " | RL/SFT steps 4/" in progress[-1]

    # Resume from an earlier checkpoint into the same folder: steps 3-4 are redone and their
    # files overwritten (with Lightning's version counter: step-000004-v1.ckpt, last-v1.ckpt).
    second = run("train.py", *overrides, "max_steps=4", f"ckpt_path={run_dir}/checkpoints/step-000002.ckpt")
    assert second.returncode == 0, second.stderr
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step-000002.ckpt", "step-000004.ckpt"]
    for done in (first, second):
        assert not [noise for noise in NOISE if noise in done.stderr + done.stdout], done.stderr


def test_a_bad_data_row_is_one_line_without_traceback(tmp_path):
    path = tmp_path / "train.jsonl"
    good = {"id": "a", "problem": "1+1?", "answer": "2", "solution": "\\boxed{2}"}
    rows = [good, {**good, "id": "b", "problem": "x\ud800"}]  # JSON's escape for a lone surrogate
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = run("train.py", *QUICK_TOY, "data=math_train", f"data.train_rows.path={path}", "~data.eval_sets",
               f"hydra.run.dir={tmp_path / 'out'}")  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"Error: {path}: row 1 (counting from 0) has a lone surrogate ('\\ud800') at character 1 of "
        "'problem' (problem), which is not text. Fix or remove the row, or set on_bad_row=skip on "
        "this source to drop and count such rows."
    )


def test_an_algorithm_left_without_demonstrations_stops_in_one_line(tmp_path):
    # Every toy demonstration is longer than 4 tokens: the SFT loss would have nothing to learn.
    done = run("train.py", *QUICK_TOY, "algorithm=rl_with_sft_loss", "data.max_demo_length=4",
               "max_steps=1", f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("Error: algorithm.sft_loss_coef=1.0 needs demonstrations, but all ")
    assert " are longer than data.max_demo_length=4 tokens " in last
