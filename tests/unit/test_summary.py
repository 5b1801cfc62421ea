"""RunSummary: which evaluations are "before" and "after", preempted runs, sets with different k."""

from __future__ import annotations

import io
import json

from rich.console import Console

from relift_pl.summary import RANDOM_WEIGHTS_NOTE, RunSummary


def metrics(level1: float, level2: float, k: int = 4) -> dict[str, float]:
    return {
        f"val/level1/avg@{k}": level1, f"val/level1/pass@{k}": 1.0,
        f"val/level2/avg@{k}": level2, f"val/level2/pass@{k}": 1.0,
        "val/avg": (level1 + level2) / 2, "val/reward_timeouts": 0, "val/reward_failures": 0,
    }  # fmt: skip


M0, M2, M4 = metrics(0.5, 0.25), metrics(0.75, 0.25), metrics(1.0, 0.5)


def summary(history, steps=4, preempted=False) -> RunSummary:
    before, after_step, after = RunSummary.before_and_after(history)
    return RunSummary(
        before=before, after=after, after_step=after_step, steps=steps, rl_steps=steps,
        sft_steps=1, demos_used=3, demos_available=12, wall_seconds=90.0, k=4, preempted=preempted,
    )  # fmt: skip


def rendered(run: RunSummary) -> str:
    console = Console(file=io.StringIO(), width=120)
    console.print(run.table())
    return console.file.getvalue()


def flat(text: str) -> str:
    """The text with every run of whitespace as one space (the caption wraps)."""
    return " ".join(text.split())


def row(text: str, name: str) -> list[str]:
    """The cells of the table row that starts with ``name``."""
    line = next(line for line in text.splitlines() if line.startswith(f"│ {name} "))
    return [cell.strip() for cell in line.strip("│").split("│")]


def saved(run: RunSummary, tmp_path) -> dict:
    run.save(tmp_path / "summary.json")
    return json.loads((tmp_path / "summary.json").read_text())


def test_before_is_the_step_0_evaluation_and_after_the_newest(tmp_path):
    run = summary([(0, M0), (2, M2), (4, M4)])
    text = rendered(run)
    assert "accuracy = avg@4" in text
    assert row(text, "level1") == ["level1", "50.0%", "100.0%", "+50.0%"]
    assert row(text, "level2") == ["level2", "25.0%", "50.0%", "+25.0%"]
    assert row(text, "avg") == ["avg", "37.5%", "75.0%", "+37.5%"]
    assert "preempted" not in text
    data = saved(run, tmp_path)
    assert (data["before"], data["after"], data["after_step"]) == (M0, M4, 4)
    assert data["preempted"] is False


def test_without_a_step_0_evaluation_there_is_no_before(tmp_path):
    # before_training=false every_n_steps=2 max_steps=4: evaluations at steps 2 and 4.
    run = summary([(2, M2), (4, M4)])
    assert row(rendered(run), "level1") == ["level1", "-", "100.0%", "-"]
    assert saved(run, tmp_path)["before"] is None
    # every_n_steps=0: one evaluation, at the end; it is "after" only, not "before" too.
    run = summary([(4, M4)])
    assert row(rendered(run), "avg") == ["avg", "-", "75.0%", "-"]


def test_a_preempted_run_without_a_later_evaluation_has_no_after(tmp_path):
    run = summary([(0, M0)], steps=3, preempted=True)
    text = rendered(run)
    assert row(text, "level1") == ["level1", "50.0%", "-", "-"]
    assert "preempted at step 3: no evaluation after step 0" in flat(text)
    data = saved(run, tmp_path)
    assert (data["preempted"], data["after"], data["after_step"]) == (True, None, None)


def test_a_preempted_run_shows_the_step_of_its_last_evaluation(tmp_path):
    run = summary([(0, M0), (2, M2)], steps=3, preempted=True)
    text = rendered(run)
    assert "after (step 2)" in text
    assert row(text, "level1") == ["level1", "50.0%", "75.0%", "+25.0%"]
    assert 'preempted at step 3: "after" is the evaluation at step 2' in flat(text)
    assert saved(run, tmp_path)["after_step"] == 2


def test_sets_with_different_k_are_labelled_with_their_k():
    after = {
        "val/aime24/avg@32": 0.5, "val/aime24/pass@32": 0.9,
        "val/math500/avg@8": 0.25, "val/math500/pass@8": 0.5, "val/avg": 0.375,
    }  # fmt: skip
    run = summary([(0, after), (4, after)])
    text = rendered(run)
    assert "accuracy = avg@k of each set" in text
    assert row(text, "aime24 (avg@32)") == ["aime24 (avg@32)", "50.0%", "50.0%", "+0.0%"]
    assert row(text, "math500 (avg@8)") == ["math500 (avg@8)", "25.0%", "25.0%", "+0.0%"]
    assert row(text, "avg") == ["avg", "37.5%", "37.5%", "+0.0%"]


def test_a_resumed_job_labels_its_wall_time_as_its_own():
    fresh = summary([(0, M0), (4, M4)])
    resumed = summary([(0, M0), (4, M4)])
    resumed.resumed = True
    assert row(rendered(fresh), "wall time")[1:] == ["", "1.5 min", ""]
    assert row(rendered(resumed), "wall time (since the resume)")[1:] == ["", "1.5 min", ""]
    assert "wall time (since" not in rendered(fresh)


def test_a_note_is_printed_under_the_table(tmp_path):
    run = summary([(0, M0), (4, M0)], steps=4, preempted=True)
    run.note = RANDOM_WEIGHTS_NOTE
    text = flat(rendered(run))
    assert RANDOM_WEIGHTS_NOTE in text and 'preempted at step 4: "after"' in text
    assert saved(run, tmp_path)["note"] == RANDOM_WEIGHTS_NOTE


def test_only_the_untrained_rehearsal_model_declares_random_weights():
    from conftest import compose_cfg

    assert compose_cfg(["experiment=paper_rehearsal"]).model.random_weights is True
    for model in ("tiny", "tiny2", "pretrained", "qwen2_5_math_7b"):
        assert not compose_cfg([f"model={model}"]).model.get("random_weights", False), model
