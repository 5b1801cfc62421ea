"""scripts/check_quickstart.py: the README's quickstart table read back, and a run that differs
beyond the tolerances named."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_quickstart", ROOT / "scripts" / "check_quickstart.py")
cq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cq)


def _summary_of(table: dict) -> dict:
    """A run's summary.json that prints ``table``."""
    def column(name):
        values = {f"val/{lvl}/avg@4": v / 100 for lvl, v in table[name].items() if lvl != "avg"}
        return values | {"val/avg": table[name]["avg"] / 100}

    return {"before": column("before"), "after": column("after"),
            **{k: table[k] for k in ("steps", "rl_steps", "sft_steps", "demos_used")}}


def test_the_readme_table_is_read_back():
    table = cq.readme_table((ROOT / "README.md").read_text())
    assert set(table["after"]) == {"level1", "level2", "level3", "level4", "avg"}
    assert table["steps"] == table["rl_steps"] > 0 and table["demos_used"] > 0
    assert cq.differences(table, _summary_of(table)) == []


def test_a_run_beyond_the_tolerances_is_named(tmp_path):
    table = cq.readme_table((ROOT / "README.md").read_text())
    run = _summary_of(table)
    run["after"]["val/level4/avg@4"] -= 0.049  # within 5 points
    run["sft_steps"] += 3
    assert cq.differences(table, run) == []
    run["after"]["val/level4/avg@4"] -= 0.02
    run["sft_steps"] += 1
    run["steps"] += 1
    wrong = cq.differences(table, run)
    assert len(wrong) == 3 and wrong[0].startswith("level4 after: README") and "steps: README" in wrong[1]
    (tmp_path / "summary.json").write_text(json.dumps(run))
    assert cq.main([str(tmp_path)]) == 1
