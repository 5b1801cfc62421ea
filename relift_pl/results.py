"""Writing an evaluation's scores: ``results.md`` (a table), ``results.csv`` and ``results.png``."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from callbacks.evaluation import SetScore  # noqa: E402

AVERAGE = "average"
"""Name of the summary row: its avg@k is ``val/avg`` (the mean of the sets' avg@k)."""


def _average(scores: Sequence[SetScore]) -> tuple[float, float]:
    n = max(len(scores), 1)
    return sum(s.avg_at_k for s in scores) / n, sum(s.pass_at_k for s in scores) / n


def _k_label(scores: Sequence[SetScore]) -> str:
    """``"4"`` when every set has k=4; ``"k"`` when the sets' k differ (each row states its k)."""
    ks = {s.k for s in scores}
    return str(ks.pop()) if len(ks) == 1 else "k"


def write_csv(scores: Sequence[SetScore], path: Path) -> None:
    """One row per benchmark plus the average; values as fractions in [0, 1], unrounded."""
    k = _k_label(scores)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", f"avg@{k}", f"pass@{k}", "problems", "k"])
        for s in scores:
            writer.writerow([s.name, repr(s.avg_at_k), repr(s.pass_at_k), s.num_problems, s.k])
        avg, pas = _average(scores)
        total = sum(s.num_problems for s in scores)
        writer.writerow([AVERAGE, repr(avg), repr(pas), total, "" if k == "k" else k])


def markdown_table(scores: Sequence[SetScore], header: Mapping[str, str] | None = None) -> str:
    """The table in percent with one decimal (the paper's style), under a short header."""
    k = _k_label(scores)
    lines = ["# Evaluation results", ""]
    lines += [f"- {key}: {value}" for key, value in (header or {}).items()]
    lines += ["", f"| benchmark | k | avg@{k} (%) | pass@{k} (%) | problems |"]
    lines += ["|---|---:|---:|---:|---:|"]
    for s in scores:
        avg, pas = f"{100 * s.avg_at_k:.1f}", f"{100 * s.pass_at_k:.1f}"
        lines.append(f"| {s.name} | {s.k} | {avg} | {pas} | {s.num_problems} |")
    avg, pas = _average(scores)
    total = sum(s.num_problems for s in scores)
    lines.append(f"| **{AVERAGE}** | | **{100 * avg:.1f}** | **{100 * pas:.1f}** | {total} |")
    return "\n".join(lines) + "\n"


def write_plot(scores: Sequence[SetScore], path: Path, title: str = "") -> None:
    """Grouped bars: avg@k and pass@k per benchmark, in percent."""
    k = _k_label(scores)
    names = [s.name if k != "k" else f"{s.name} (k={s.k})" for s in scores]
    x = range(len(names))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4))
    try:
        avg_bars = ax.bar([i - width / 2 for i in x], [100 * s.avg_at_k for s in scores], width,
                          label=f"avg@{k}")
        pass_bars = ax.bar([i + width / 2 for i in x], [100 * s.pass_at_k for s in scores], width,
                           label=f"pass@{k}")
        for bars in (avg_bars, pass_bars):
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set_ylabel("% correct")
        ax.set_ylim(0, 105)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def write_results(
    scores: Sequence[SetScore], out_dir: str | Path, header: Mapping[str, str] | None = None
) -> dict[str, Path]:
    """Writes ``results.md``, ``results.csv`` and ``results.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"results.{ext}" for ext in ("md", "csv", "png")}
    paths["md"].write_text(markdown_table(scores, header))
    write_csv(scores, paths["csv"])
    write_plot(scores, paths["png"], title=(header or {}).get("model", ""))
    return paths
