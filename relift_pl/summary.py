"""The table a run ends with: accuracy per eval set before and after training, and the counters."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

_AVG_AT_K = re.compile(r"^val/(.+)/avg@(\d+)$")
NONE = "-"
RANDOM_WEIGHTS_NOTE = (
    "model.random_weights: the model is untrained, so 0% on every set is expected (this run checks "
    "that the recipe runs end to end, not what it learns)"
)


@dataclass
class RunSummary:
    before: dict[str, float] | None
    """The evaluation at step 0; None (null in summary.json) when the run did not evaluate it."""
    after: dict[str, float] | None
    """The newest evaluation after step 0 (at ``after_step``); None when there was none."""
    steps: int
    rl_steps: int
    sft_steps: int
    demos_used: int
    demos_available: int
    wall_seconds: float
    k: int | dict[str, int]
    """Samples per problem: one k for every set, or ``{set: k}``."""
    extra: dict[str, float] = field(default_factory=dict)
    after_step: int | None = None
    """The training step of ``after`` (``steps`` unless the run stopped without evaluating)."""
    preempted: bool = False
    """The run stopped on a signal at ``steps``, without its final evaluation."""
    resumed: bool = False
    """The job resumed from a checkpoint: ``wall_seconds`` is this job's (the time split in
    ``extra`` covers the whole run)."""
    note: str | None = None
    """A line printed under the table (``model.random_weights``: why every score is 0)."""

    @staticmethod
    def before_and_after(
        history: Sequence[tuple[int, dict[str, float]]],
    ) -> tuple[dict[str, float] | None, int | None, dict[str, float] | None]:
        """``(before, after_step, after)`` from an evaluation history of ``(step, metrics)``.

        "before" is the evaluation at step 0 only (not the first one, which may come after training
        started); "after" is the newest one after step 0. Either is None when there is none, so a
        run evaluated once never shows the same numbers as both.
        """
        before = next((metrics for step, metrics in history if step == 0), None)
        after_step, after = next(((s, m) for s, m in reversed(history) if s > 0), (None, None))
        return before, after_step, after

    def save(self, path: str | Path) -> None:
        """Writes the summary as JSON (what scripts aggregating many runs read)."""
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    def sets(self) -> list[tuple[str, int]]:
        """``(set name, k)`` of every set in either evaluation, in logged order."""
        keys = [*(self.after or {}), *(self.before or {})]
        found = [m.groups() for m in map(_AVG_AT_K.match, keys) if m]
        return list(dict.fromkeys((name, int(k)) for name, k in found))

    def _title(self, ks: set[int]) -> str:
        accuracy = f"avg@{ks.pop()}" if len(ks) == 1 else "avg@k of each set"
        return f"relift-pl run summary (accuracy = {accuracy})"

    def _caption(self) -> str | None:
        lines = [self.note] if self.note else []
        if self.preempted and self.after_step is None:
            lines.append(f"preempted at step {self.steps}: no evaluation after step 0, so no "
                         '"after"; resume with ckpt_path=last to finish')  # fmt: skip
        elif self.preempted:
            lines.append(f'preempted at step {self.steps}: "after" is the evaluation at step '
                         f"{self.after_step}")  # fmt: skip
        return "\n".join(lines) or None

    def table(self) -> Table:
        sets = self.sets()
        mixed = len({k for _, k in sets}) > 1
        table = Table(title=self._title({k for _, k in sets}), caption=self._caption())
        table.add_column("eval set")
        table.add_column("before", justify="right")
        stale = self.after_step is not None and self.after_step != self.steps
        table.add_column(f"after (step {self.after_step})" if stale else "after", justify="right")
        table.add_column("change", justify="right")
        rows = [(f"{name} (avg@{k})" if mixed else name, f"val/{name}/avg@{k}") for name, k in sets]
        for label, key in [*rows, ("avg", "val/avg")]:
            before, after = (None if m is None else m.get(key) for m in (self.before, self.after))
            change = NONE if before is None or after is None else f"{after - before:+.1%}"
            cells = (NONE if v is None else f"{v:.1%}" for v in (before, after))
            table.add_row(label, *cells, change)
        table.add_section()
        frac = self.demos_used / max(self.demos_available, 1)
        table.add_row("training steps", "", str(self.steps), "")
        table.add_row("RL steps / SFT steps", "", f"{self.rl_steps} / {self.sft_steps}", "")
        table.add_row("demos used / available", "", f"{self.demos_used} / {self.demos_available}", f"{frac:.1%}")
        wall = "wall time (since the resume)" if self.resumed else "wall time"
        table.add_row(wall, "", f"{self.wall_seconds / 60:.1f} min", "")
        for phase, seconds, share in self.time_split():
            table.add_row(f"  time: {phase}", "", f"{seconds / 60:.1f} min", f"{share:.0%}")
        peak = {k: v for k, v in self.extra.items() if k.startswith("perf/peak_")}
        for key, value in peak.items():
            label = "peak device memory" if "memory" in key else "peak host memory (RSS)"
            table.add_row(label, "", f"{value:.1f} GiB", "")
        return table

    def time_split(self) -> list[tuple[str, float, float]]:
        """``(phase, seconds, share)`` of the timed phases (``timing/<phase>_s`` totals in
        ``extra``: rollout, weight sync, reward, RL update, SFT, evaluation), largest first."""
        phases = {k[len("timing/"):-len("_s")].replace("_", " "): v for k, v in self.extra.items()
                  if k.startswith("timing/") and k.endswith("_s")}
        total = sum(phases.values())
        ranked = sorted(phases.items(), key=lambda item: -item[1])
        return [(name, value, value / total) for name, value in ranked] if total else []

    def print(self) -> None:
        Console().print(self.table())
