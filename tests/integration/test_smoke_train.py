"""A whole CPU training run on the toy world, through the same train code users run."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from relift_pl.train import fit
from toy_overrides import QUICK_TOY

REQUIRED_TAGS = {
    "train/reward_mean", "train/solve_none_rate", "rl/loss", "rl/entropy", "rl/grad_norm",
    "sft/loss", "sft/grad_norm", "buffer/size", "train/demos_used_frac",
    "train/response_length_mean", "train/truncated_frac",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from conftest import compose_cfg

    out = tmp_path_factory.mktemp("smoke")
    cfg = compose_cfg([
        *QUICK_TOY,  # 16 sequences per step with micro_batch_size=8: 2 micro-batches accumulated
        "max_steps=3",
        # Only the hardest level, so every prompt is all-wrong and the buffer fills for sure.
        "data.train_rows.levels=[4]",
        "callbacks.sample_completions.every_n_steps=1",
    ], output_dir=out)
    return fit(cfg), out


def test_sft_step_happened_and_buffer_drained(smoke):
    result, _ = smoke
    module = result.module
    assert module.rl_step == 3
    # Every step pushes 4 hardest rows and M=4: one SFT step per RL step, buffer drained each time.
    assert module.sft_step == 3
    assert len(module.buffer) == 0
    assert result.summary.sft_steps == 3
    assert 0 < len(module.demos_used) <= 12


def test_both_optimizers_stepped(smoke):
    result, _ = smoke
    rl_opt, sft_opt = (opt.optimizer for opt in result.module.optimizers())
    assert rl_opt is not sft_opt
    for opt in (rl_opt, sft_opt):
        steps = [state["step"] for state in opt.state.values()]
        assert steps and all(float(s) == 3 for s in steps)


def test_tensorboard_has_required_tags_and_samples(smoke):
    _, out = smoke
    event_files = list(Path(out).rglob("events.out.tfevents.*"))
    assert event_files
    tags = set()
    text = []
    for path in event_files:
        acc = EventAccumulator(str(path), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
        text += acc.Tags()["tensors"]
    missing = REQUIRED_TAGS - tags
    assert not missing, f"missing TensorBoard tags: {sorted(missing)}"
    assert any(t.startswith("val/level4/avg@2") for t in tags)
    assert any("samples/completions" in t for t in text)


def test_summary_reports_before_and_after(smoke):
    result, _ = smoke
    summary = result.summary
    assert summary.sets() == [("level1", 2), ("level2", 2), ("level3", 2), ("level4", 2)]
    assert summary.before.keys() == summary.after.keys()
    assert summary.demos_available == result.datamodule.demos_available > 0


def test_summary_json_and_per_problem_scores_agree_with_the_logged_accuracy(smoke):
    import json

    result, out = smoke
    saved = json.loads((out / "summary.json").read_text())
    assert saved["after"] == result.summary.after and saved["sft_steps"] == 3
    lines = [json.loads(x) for x in (out / "eval" / "per_problem.jsonl").read_text().splitlines()]
    # Before and after training, one line per set.
    assert [(x["step"], x["set"]) for x in lines] == [
        (step, f"level{i}") for step in (0, 3) for i in (1, 2, 3, 4)
    ]
    ids = {row["id"] for row in result.datamodule.eval_sets["level4"][:4]}
    for line in lines[-4:]:
        assert len(line["correct"]) == 4 and line["tokens"].keys() == line["correct"].keys()
        mean = sum(line["correct"].values()) / 4
        assert mean == pytest.approx(result.summary.after[f"val/{line['set']}/avg@2"])
        assert all(0 < t <= 24 for t in line["tokens"].values())  # max_new_tokens=24
    assert set(lines[-1]["correct"]) == ids
