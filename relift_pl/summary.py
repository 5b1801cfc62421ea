"""The table a run ends with: accuracy per eval set before and after training, and the counters."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table


@dataclass
class RunSummary:
    before: dict[str, float]
    after: dict[str, float]
    steps: int
    rl_steps: int
    sft_steps: int
    demos_used: int
    demos_available: int
    wall_seconds: float
    k: int
    extra: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Writes the summary as JSON (what scripts aggregating many runs read)."""
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    def sets(self) -> list[str]:
        suffix = f"/avg@{self.k}"
        return [key[len("val/") : -len(suffix)] for key in self.after if key.endswith(suffix)]

    def table(self) -> Table:
        table = Table(title=f"relift-pl run summary (accuracy = avg@{self.k})")
        table.add_column("eval set")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        table.add_column("change", justify="right")
        for name in self.sets() + ["avg"]:
            key = f"val/{name}/avg@{self.k}" if name != "avg" else "val/avg"
            before, after = self.before.get(key, float("nan")), self.after.get(key, float("nan"))
            table.add_row(name, f"{before:.1%}", f"{after:.1%}", f"{after - before:+.1%}")
        table.add_section()
        frac = self.demos_used / max(self.demos_available, 1)
        table.add_row("training steps", "", str(self.steps), "")
        table.add_row("RL steps / SFT steps", "", f"{self.rl_steps} / {self.sft_steps}", "")
        table.add_row("demos used / available", "", f"{self.demos_used} / {self.demos_available}", f"{frac:.1%}")
        table.add_row("wall time", "", f"{self.wall_seconds / 60:.1f} min", "")
        return table

    def print(self) -> None:
        Console().print(self.table())
