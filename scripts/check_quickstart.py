"""Checks the README's quickstart table against a `python train.py` run (CI runs it after the
README's first command): a table that no longer describes what the default run does fails here.

    python scripts/check_quickstart.py                # the newest run under outputs/
    python scripts/check_quickstart.py <run folder>   # a given one

The shipped base is pinned, but another CPU's float kernels train it along another path, so the
check allows what such a change can move (measured: the same run with PyTorch's AVX2 kernels
instead of AVX-512 gave the same table): the "before" column within one level-1 sample, "after"
within 5 points per level, the SFT steps within 3 and the demonstrations within 3 SFT steps'.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- numbers: quickstart -->"
TOLERANCE = {"before": 1.0, "after": 5.0, "sft_steps": 3, "demos_used": 48}


def readme_table(text: str) -> dict:
    """The quickstart block's figures: {"before": {level: %}, "after": {level: %}, "steps",
    "rl_steps", "sft_steps", "demos_used"}."""
    start = text.index(MARKER)
    block = text[start : text.index("```\n", text.index("```text", start) + 7)]
    table: dict = {"before": {}, "after": {}}
    for name, before, after in re.findall(r"│ (level\d|avg)\s+│\s+([\d.]+)% │\s+([\d.]+)% │", block):
        table["before"][name], table["after"][name] = float(before), float(after)
    table["steps"] = int(re.search(r"│ training steps\s+│\s+│\s+(\d+) │", block).group(1))
    rl, sft = re.search(r"│ RL steps / SFT steps\s+│\s+│\s+(\d+) / (\d+) │", block).groups()
    table["rl_steps"], table["sft_steps"] = int(rl), int(sft)
    table["demos_used"] = int(re.search(r"│ demos used / available\s+│\s+│\s+(\d+) / \d+ │", block).group(1))
    return table


def differences(table: dict, summary: dict) -> list[str]:
    """What the run (its ``summary.json``) shows beyond the tolerances, one line each."""
    wrong = []
    for column in ("before", "after"):
        for name, expected in table[column].items():
            key = "val/avg" if name == "avg" else f"val/{name}/avg@4"
            measured = summary[column][key] * 100
            if abs(measured - expected) > TOLERANCE[column]:
                wrong.append(f"{name} {column}: README {expected:.1f}%, run {measured:.1f}%")
    for key in ("steps", "rl_steps"):
        if summary[key] != table[key]:
            wrong.append(f"{key}: README {table[key]}, run {summary[key]}")
    for key in ("sft_steps", "demos_used"):
        if abs(summary[key] - table[key]) > TOLERANCE[key]:
            wrong.append(f"{key}: README {table[key]}, run {summary[key]}")
    return wrong


def main(argv: list[str]) -> int:
    if argv:
        run = Path(argv[0])
    else:
        found = sorted(ROOT.glob("outputs/*/*/summary.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            print("no run under outputs/: run `python train.py` first", file=sys.stderr)
            return 2
        run = found[-1].parent
    wrong = differences(readme_table((ROOT / "README.md").read_text()), json.loads((run / "summary.json").read_text()))
    if wrong:
        print(f"README.md's quickstart table does not describe {run}: " + "; ".join(wrong)
              + ". Paste the run's summary into README.md (between the quickstart markers).", file=sys.stderr)
        return 1
    print(f"README.md's quickstart table describes {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
