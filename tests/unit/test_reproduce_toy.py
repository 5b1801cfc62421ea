"""The toy study's aggregation: categories of the capability map and the table, on synthetic runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "reproduce_toy.py"
spec = importlib.util.spec_from_file_location("reproduce_toy", SCRIPT)
reproduce_toy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce_toy)
LEVELS = reproduce_toy.LEVELS


def run(final: dict[str, float], base: dict[str, float], sft_steps: int = 0, used: int = 0) -> dict:
    def at(scores):  # every question is in level1 except "h", a level4 question
        return {s: {"correct": {q: v for q, v in scores.items() if (q == "h") == (s == "level4")},
                    "tokens": {q: 10.0 for q in scores if (q == "h") == (s == "level4")}}
                for s in LEVELS}
    return {"summary": {"demos_used": used, "demos_available": 10, "rl_steps": 4, "sft_steps": sft_steps},
            "evals": {0: at(base), 4: at(final)}}


BASE = {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0, "e": 1.0, "h": 0.0}


def test_capability_categories():
    runs = {
        # GRPO learns b; ReLIFT learns b and c (c only with SFT) and loses e; nobody learns d.
        "grpo": [run({"a": 1, "b": 1, "c": 0, "d": 0, "e": 1, "h": 0}, BASE)],
        "relift": [run({"a": 1, "b": 0.75, "c": 0.5, "d": 0.25, "e": 0.25, "h": 0.75}, BASE)],
    }
    order, categories, finals = reproduce_toy.capability(runs)
    by_q = dict(zip(order, [c for s in LEVELS for c in categories[s]]))
    assert by_q == {"a": "solved by the base", "b": "learned by RL", "c": "learned only with SFT",
                    "d": "never", "e": "lost by ReLIFT", "h": "learned only with SFT"}
    assert finals["base"]["b"] == 0.0 and finals["relift"]["c"] == 0.5


def test_questions_only_sft_only_solves_count_as_learned_with_sft():
    runs = {
        "grpo": [run(BASE, BASE)],
        "sft": [run({**BASE, "h": 1.0}, BASE)],
        "relift": [run(BASE, BASE)],
    }
    order, categories, _ = reproduce_toy.capability(runs)
    assert dict(zip(order, [c for s in LEVELS for c in categories[s]]))["h"] == "learned only with SFT"


def test_capability_averages_seeds_before_thresholding():
    # c: solved in one seed of two (1.0, 0.0): mean 0.5 counts as solved; d (0.5, 0.25) does not.
    runs = {
        "grpo": [run({q: 0.0 for q in BASE}, BASE)] * 2,
        "relift": [run({**BASE, "c": 1.0, "d": 0.5}, BASE), run({**BASE, "c": 0.0, "d": 0.25}, BASE)],
    }
    order, categories, _ = reproduce_toy.capability(runs)
    by_q = dict(zip(order, [c for s in LEVELS for c in categories[s]]))
    assert by_q["c"] == "learned only with SFT" and by_q["d"] == "never"


def test_table_means_and_stds_over_seeds():
    finals = [{**BASE, "h": 1.0}, {**BASE, "h": 0.0}]
    runs = {"relift": [run(f, BASE, sft_steps=3, used=2) for f in finals]}
    lines = reproduce_toy.table(runs).splitlines()
    base_row, relift_row = lines[2], lines[3]
    assert base_row.startswith("| base (step 0) | 40.0 |")  # level1: a, e of a..e solved
    cells = [c.strip() for c in relift_row.split("|")[1:-1]]
    assert cells[0] == "relift" and cells[1] == "40.0 ± 0.0"
    assert cells[4] == "50.0 ± 70.7"  # level4: 1 and 0 over two seeds
    assert cells[6] == "20.0 ± 0.0" and cells[8] == "4 / 3"


def test_every_method_has_a_config():
    for overrides in reproduce_toy.METHODS.values():
        name = overrides[0].split("=")[1]
        assert (SCRIPT.parents[1] / "conf" / "algorithm" / f"{name}.yaml").exists()


@pytest.mark.parametrize("split", ["val", "test"])
def test_runs_are_scored_on_the_requested_split(split):
    args = reproduce_toy.argparse.Namespace(steps=10, split=split, overrides=[])
    cmd = reproduce_toy.command("sft_then_rl", 1, Path("/tmp/x"), args)
    assert "algorithm.sft_warmup_steps=5" in cmd and "seed=1" in cmd
    assert ("data.eval_sets.level4.split=val" in cmd) == (split == "val")
