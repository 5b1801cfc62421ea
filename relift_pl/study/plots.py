"""The study's figures: curves per method, the capability map, the premise on every base."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from relift_pl.study.stats import (  # noqa: E402
    CATEGORIES,
    LEVELS,
    SOLVED,
    accuracy,
    capability,
    response_tokens,
)

Runs = dict[str, dict[int, dict]]


def plot_capability(base: dict[str, float], finals: dict[str, dict[str, float]], levels: dict[str, str],
                    path: Path, samples: str, split_name: str = "test") -> tuple[dict, dict, dict]:
    """Per question, which policies solve it (a heat map) and the capability categories per
    level (:func:`relift_pl.study.stats.capability`); returns (category, counts, per-level counts)."""
    category, counts = capability(base, finals)
    per_level = {m: {} for m in finals}
    for s in LEVELS:
        qs = {q for q in base if levels[q] == s}
        _, c = capability({q: base[q] for q in qs}, {m: {q: f.get(q, 0.0) for q in qs} for m, f in finals.items()})
        for m in finals:
            per_level[m][s] = c[m]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    columns = sorted(base, key=lambda q: (LEVELS.index(levels[q]), -base[q], -finals.get("relift", {}).get(q, 0)))
    names = ["base", *finals]
    grid = [[(base if n == "base" else finals[n]).get(q, 0.0) for q in columns] for n in names]
    image = left.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    left.set_yticks(range(len(names)), names)
    bounds = [0]
    for s in LEVELS:
        bounds.append(bounds[-1] + sum(levels[q] == s for q in columns))
    left.set_xticks([(a + b) / 2 for a, b in zip(bounds, bounds[1:])], LEVELS)
    for b in bounds[1:-1]:
        left.axvline(b - 0.5, color="white", lw=2)
    left.set_title(f"each {split_name} question: share of samples correct ({samples})", fontsize=9)
    fig.colorbar(image, ax=left, fraction=0.025)
    bottom = [0] * len(LEVELS)
    for cat, color in CATEGORIES.items():
        vals = [sum(category[q] == cat for q in base if levels[q] == s) for s in LEVELS]
        right.bar(LEVELS, vals, bottom=bottom, color=color, label=cat)
        bottom = [b + v for b, v in zip(bottom, vals)]
    right.set_ylabel(f"{split_name} questions")
    right.set_title(f"solved = share >= {SOLVED:g} ({samples});\ncategories over base + "
                    + ", ".join(finals), fontsize=9)
    right.legend(handles=[Patch(color=c, label=k) for k, c in CATEGORIES.items()], fontsize=8,
                 loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return category, counts, per_level


def plot_curves(runs: Runs, path: Path, split_name: str, main: list[str], k: int = 4) -> None:
    """Accuracy per level and on average, and response tokens, vs training step: one line per
    method (mean over seeds, band ± sample std; solid for the ``main`` methods)."""
    fig, axes = plt.subplots(1, 6, figsize=(26, 4.2))
    for method, seeds in runs.items():
        rs = list(seeds.values())
        steps = sorted(set.intersection(*(set(r["evals"]) for r in rs)))
        style = "-" if method in main else "--"
        for ax, key in zip(axes, [*LEVELS, "avg"]):
            ys = [[accuracy(r["evals"][t])[key] * 100 for r in rs] for t in steps]
            mean = [statistics.fmean(y) for y in ys]
            std = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            line, = ax.plot(steps, mean, style, label=f"{method} (n={len(rs)})", lw=2 if method == "relift" else 1.2)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.1)
        toks = [[response_tokens(r["evals"][t])["avg"] for r in rs] for t in steps]
        axes[-1].plot(steps, [statistics.fmean(t) for t in toks], style, lw=2 if method == "relift" else 1.2)
    for ax, key in zip(axes, [*LEVELS, "average"]):
        ax.set_title(f"{key} ({split_name}, avg@{k})")
        ax.set_ylabel("accuracy %")
    axes[-1].set_title(f"response tokens ({split_name}, mean of levels)")
    axes[-1].set_ylabel("tokens")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[4].legend(fontsize=7, loc="lower right")
    fig.suptitle("mean over seeds; band = ± sample std", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bases(bases: dict[str, dict[str, dict]], path: Path) -> None:
    """Level-4 accuracy vs training step on every base (one panel each): ``bases[name]`` =
    {run name: run} (GRPO, LUFFY, SFT on level 4)."""
    fig, axes = plt.subplots(1, len(bases), figsize=(4.6 * len(bases), 3.6), sharey=True, squeeze=False)
    for ax, (name, runs) in zip(axes[0], bases.items()):
        for (run_name, run), style in zip(runs.items(), ["--o", "-s", ":^"]):  # lines at 0 overlap
            steps = sorted(run["evals"])
            ax.plot(steps, [accuracy(run["evals"][t])["level4"] * 100 for t in steps], style, ms=4,
                    label=run_name, alpha=0.85)
        ax.set_title(f"base {name}: level 4 (validation, avg@4)", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy %")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
