#!/usr/bin/env python3
"""The paper in miniature: every method of ReLIFT's table on the toy world, several seeds.

    python scripts/reproduce_toy.py                    # 8 methods x 3 seeds, 2 runs at a time
    python scripts/reproduce_toy.py --seeds 0 --jobs 1 --methods grpo relift
    python scripts/reproduce_toy.py --split val        # choose settings here, never on test

Each run is ``python train.py experiment=toy_paper algorithm=<method> seed=<s>``; the methods
differ only in configuration (``METHODS``). Runs go to ``--runs-dir/<split>/<method>/seed<s>``
and are skipped when their ``summary.json`` exists, so a stopped study continues where it was.
The aggregate goes to ``--out`` (``docs/results`` for the test split):

- ``toy_table.md``: accuracy (avg@4) per level, average, demonstrations used, response length,
  mean +- std over seeds, from the final evaluation;
- ``toy_curves.png``: held-out accuracy vs training step per method (mean over seeds, band = std);
- ``toy_capability_map.png``: per question, what it takes to solve it (see ``capability``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Hydra overrides per method, on top of experiment=toy_paper (see conf/algorithm/*.yaml). The
# SFT learning rates were chosen per method on the validation split (docs/results/toy_tuning.md):
# SFT-only 1e-3 of {2e-4, 5e-4, 1e-3}; ReLIFT 2e-4 of {2e-4, 5e-4, 1e-3}; the ablations and
# baselines reuse them. RL lr 2e-4 everywhere (the toy default).
SFT_ONLY_LR = "algorithm.sft_optimizer.lr=1e-3"
RELIFT_LR = "algorithm.sft_optimizer.lr=2e-4"
METHODS: dict[str, list[str]] = {
    "grpo": ["algorithm=grpo"],
    "sft": ["algorithm=sft", SFT_ONLY_LR],
    "sft_then_rl": ["algorithm=sft_then_rl", "algorithm.sft_warmup_steps={half}", SFT_ONLY_LR],
    "rl_with_sft_loss": ["algorithm=rl_with_sft_loss"],
    "relift": ["algorithm=relift", RELIFT_LR],
    # Chosen after the first study on validation (toy_tuning.md): M=4, more and smaller SFT steps.
    "relift_m4": ["algorithm=relift", "algorithm.buffer_threshold=4", "algorithm.sft_optimizer.lr=5e-4"],
    "relift_every_step": ["algorithm=relift_every_step", RELIFT_LR],
    # Every 3 steps: about as many SFT steps as ReLIFT takes (45 in 150 steps on validation).
    "relift_uniform": ["algorithm=relift_uniform", "algorithm.sft_interval=3", RELIFT_LR],
    "relift_random_buffer": ["algorithm=relift_random_buffer", RELIFT_LR],
}
LEVELS = ["level1", "level2", "level3", "level4"]
SOLVED = 0.5  # a question counts as solved when at least half of its k samples are correct


def run_dir(runs: Path, split: str, method: str, seed: int) -> Path:
    return runs / split / method / f"seed{seed}"


def command(method: str, seed: int, out: Path, args) -> list[str]:
    overrides = [o.format(half=args.steps // 2) for o in METHODS[method]]
    if args.split != "test":  # the same sets, drawn from the validation split
        overrides += [f"data.eval_sets.{lvl}.split={args.split}" for lvl in LEVELS]
    return [
        sys.executable, str(ROOT / "train.py"), "experiment=toy_paper", *overrides,
        f"seed={seed}", f"max_steps={args.steps}", f"hydra.run.dir={out}",
        "callbacks.progress_bar=null", *args.overrides,
    ]


def finished(out: Path, steps: int) -> bool:
    # A preempted run (SIGTERM) also writes a summary, with fewer steps.
    return (out / "summary.json").exists() and json.loads((out / "summary.json").read_text())["steps"] >= steps


def launch(method: str, seed: int, args) -> tuple[str, int, float, int]:
    out = run_dir(Path(args.runs_dir), args.split, method, seed)
    if finished(out, args.steps):
        return method, seed, 0.0, 0
    out.mkdir(parents=True, exist_ok=True)
    cmd = command(method, seed, out, args)
    if any((out / "checkpoints").glob("*.ckpt")):  # a stopped run continues where it was
        cmd.append("ckpt_path=last")
    started = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(out / "stdout.log", "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    return method, seed, time.time() - started, rc


def build_base(args) -> None:
    """Builds (or finds) the cached toy base once, before parallel runs would race to build it."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import relift_pl.train  # noqa: F401  (registers the config's relift_root resolver)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=toy_paper", *args.overrides])
    print(f"toy base: {instantiate(cfg.model.build)()}", flush=True)


# -- aggregation ---------------------------------------------------------------------------------
def load_run(path: Path) -> dict:
    """{"summary": ..., "evals": {step: {set: {"correct": {id: v}, "tokens": {id: v}}}}}."""
    evals: dict[int, dict] = defaultdict(dict)
    for line in (path / "eval" / "per_problem.jsonl").read_text().splitlines():
        rec = json.loads(line)
        evals[rec["step"]][rec["set"]] = rec
    return {"summary": json.loads((path / "summary.json").read_text()), "evals": dict(evals)}


def accuracy(eval_at_step: dict) -> dict[str, float]:
    acc = {s: statistics.fmean(eval_at_step[s]["correct"].values()) for s in LEVELS}
    return acc | {"avg": statistics.fmean(acc[s] for s in LEVELS)}


def per_question(eval_at_step: dict, field: str = "correct") -> dict[str, float]:
    """Question id -> value (share correct, or mean response tokens) over every level's set."""
    return {q: v for s in LEVELS for q, v in eval_at_step[s][field].items()}


def level_of(runs: dict[str, list[dict]]) -> dict[str, str]:
    """Question id -> its level (the sets are the same in every run)."""
    evals = next(iter(runs.values()))[0]["evals"][0]
    return {q: s for s in LEVELS for q in evals[s]["correct"]}


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(runs: dict[str, list[dict]]) -> str:
    head = ["method", *LEVELS, "avg", "demos used %", "response tokens", "RL / SFT steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    any_run = next(iter(runs.values()))[0]
    base = accuracy(any_run["evals"][0])
    base_tokens = statistics.fmean(per_question(any_run["evals"][0], "tokens").values())
    lines.append("| base (step 0) | " + " | ".join(f"{base[s] * 100:.1f}" for s in [*LEVELS, "avg"])
                 + f" | 0 | {base_tokens:.1f} | 0 / 0 |")
    for method, seeds in runs.items():
        finals = [accuracy(r["evals"][max(r["evals"])]) for r in seeds]
        used = [r["summary"]["demos_used"] / r["summary"]["demos_available"] for r in seeds]
        tokens = [statistics.fmean(per_question(r["evals"][max(r["evals"])], "tokens").values()) for r in seeds]
        steps = seeds[0]["summary"]
        cells = [mean_std([f[s] for f in finals]) for s in [*LEVELS, "avg"]]
        cells += [mean_std(used), mean_std(tokens, scale=1.0), f"{steps['rl_steps']} / "
                  + "/".join(sorted({str(r['summary']['sft_steps']) for r in seeds}))]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def capability(runs: dict[str, list[dict]]) -> tuple[list[str], dict[str, list[str]], dict[str, dict[str, float]]]:
    """Each test question's category, from the base and the final policies (mean over seeds):

    solved by the base (and kept by ReLIFT); learned by RL (GRPO solves it); learned only with
    SFT (SFT-only or ReLIFT solves it, GRPO does not); never; and "lost by ReLIFT" (the base
    solved it, ReLIFT's final policy does not)."""
    def final(method: str) -> dict[str, float]:
        per_seed = [per_question(r["evals"][max(r["evals"])]) for r in runs[method]]
        return {k: statistics.fmean(d[k] for d in per_seed) for k in per_seed[0]}

    base = per_question(next(iter(runs.values()))[0]["evals"][0])
    levels = level_of(runs)
    finals = {"base": base} | {m: final(m) for m in ("grpo", "sft", "sft_then_rl", "relift") if m in runs}

    def solves(method: str, q: str) -> bool:
        return finals.get(method, {}).get(q, 0.0) >= SOLVED

    categories: dict[str, list[str]] = {s: [] for s in LEVELS}
    order = []
    for q in base:
        if solves("base", q):
            cat = "solved by the base" if solves("relift", q) else "lost by ReLIFT"
        elif solves("grpo", q):
            cat = "learned by RL"
        elif solves("sft", q) or solves("relift", q):
            cat = "learned only with SFT"
        else:
            cat = "never"
        categories[levels[q]].append(cat)
        order.append(q)
    return order, categories, finals


CATEGORY_COLORS = {
    "solved by the base": "#9ecae1", "learned by RL": "#31a354", "learned only with SFT": "#e6550d",
    "never": "#d9d9d9", "lost by ReLIFT": "#756bb1",
}


def plot_curves(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2), sharey=True)
    for method, seeds in runs.items():
        steps = sorted(set.intersection(*(set(r["evals"]) for r in seeds)))
        for ax, key in zip(axes, [*LEVELS, "avg"]):
            ys = [[accuracy(r["evals"][t])[key] * 100 for r in seeds] for t in steps]
            mean = [statistics.fmean(y) for y in ys]
            std = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            style = "-" if method in ("grpo", "sft", "relift") else "--"
            line, = ax.plot(steps, mean, style, label=method, lw=2 if method == "relift" else 1.2)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.12)
    for ax, key in zip(axes, [*LEVELS, "average"]):
        ax.set_title(f"{key} (test, avg@4)")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy %")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_capability(runs: dict[str, list[dict]], path: Path) -> dict[str, dict[str, int]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    order, categories, finals = capability(runs)
    levels = level_of(runs)
    counts = {s: {c: categories[s].count(c) for c in CATEGORY_COLORS} for s in LEVELS}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [3, 2]})
    # Left: every test question (columns, grouped by level) x policy (rows): share of k correct.
    columns = sorted(order, key=lambda q: (LEVELS.index(levels[q]), -finals["base"][q],
                                           -finals.get("relift", {}).get(q, 0)))
    names = list(finals)
    grid = [[finals[n].get(q, 0.0) for q in columns] for n in names]
    image = left.imshow(grid, aspect="auto", cmap=ListedColormap(plt.cm.viridis.colors), vmin=0, vmax=1,
                        interpolation="nearest")
    left.set_yticks(range(len(names)), [f"{n} (final)" if n != "base" else "base" for n in names])
    bounds = [0]
    for s in LEVELS:
        bounds.append(bounds[-1] + sum(levels[q] == s for q in columns))
    left.set_xticks([(a + b) / 2 for a, b in zip(bounds, bounds[1:])], LEVELS)
    for b in bounds[1:-1]:
        left.axvline(b - 0.5, color="white", lw=2)
    left.set_title("each test question: share of its 4 samples correct (mean over seeds)")
    fig.colorbar(image, ax=left, fraction=0.025)
    # Right: how each level's questions came to be solved.
    bottom = [0] * len(LEVELS)
    for cat, color in CATEGORY_COLORS.items():
        vals = [counts[s][cat] for s in LEVELS]
        right.bar(LEVELS, vals, bottom=bottom, color=color, label=cat)
        bottom = [b + v for b, v in zip(bottom, vals)]
    right.set_ylabel("test questions")
    right.set_title("what it takes (solved = at least 2 of 4 samples)")
    right.legend(handles=[Patch(color=c, label=k) for k, c in CATEGORY_COLORS.items()], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return counts


def write_outputs(args, runs: dict[str, list[dict]]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = [
        f"# Toy world: every method, {len(next(iter(runs.values())))} seeds ({args.split} split)", "",
        f"`python scripts/reproduce_toy.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
        "Accuracy = avg@4 (% of 4 samples at T=1 correct) on the held-out "
        f"{args.split} questions per level, after {args.steps} training steps, mean ± std over seeds. "
        "Demos used = distinct demonstrations that entered an SFT step (or the SFT loss) / all training "
        "demonstrations. Response tokens = mean response length at the final evaluation.", "",
        "Budget, the same for every method: the same base, the same training steps of B=16 prompts "
        "(the same prompts in the same order for a seed), G=8 samples per prompt for RL steps, "
        "at most one RL and one SFT optimizer step per training step (RL with SFT loss: one joint "
        "step). SFT learning rates were chosen per method on the validation split "
        "(docs/results/toy_tuning.md); the test questions were used for nothing else.", "",
        table(runs), "",
    ]
    if {"grpo", "relift"} <= set(runs):
        counts = plot_capability(runs, out / "toy_capability_map.png")
        text += ["Capability map (test questions per level; solved = at least 2 of 4 samples, mean over seeds):", "",
                 "| level | " + " | ".join(CATEGORY_COLORS) + " |", "|---|" + "---|" * len(CATEGORY_COLORS)]
        text += [f"| {s} | " + " | ".join(str(counts[s][c]) for c in CATEGORY_COLORS) + " |" for s in LEVELS]
        text.append("")
    plot_curves(runs, out / "toy_curves.png")
    (out / "toy_table.md").write_text("\n".join(text))
    print("\n".join(text))
    print(f"wrote {out / 'toy_table.md'}, {out / 'toy_curves.png'}"
          + (f", {out / 'toy_capability_map.png'}" if {"grpo", "relift"} <= set(runs) else ""))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150, help="training steps per run (max_steps)")
    ap.add_argument("--split", default="test", choices=["val", "test"], help="questions the runs are scored on")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    ap.add_argument("--runs-dir", default=str(ROOT / ".cache" / "reproduce_toy"))
    ap.add_argument("--out", default=None, help="default: docs/results (test) or <runs-dir>/val")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    args.out = args.out or str(ROOT / "docs" / "results" if args.split == "test" else Path(args.runs_dir) / "val")
    from rich.progress import Progress

    build_base(args)
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    failed = []
    with Progress() as progress, ThreadPoolExecutor(args.jobs) as pool:
        task = progress.add_task(f"{len(jobs)} runs", total=len(jobs))
        for method, seed, seconds, rc in pool.map(lambda job: launch(*job, args), jobs):
            progress.advance(task)
            where = run_dir(Path(args.runs_dir), args.split, method, seed)
            if rc:
                failed.append(f"{method} seed {seed} (exit {rc}; see {where / 'stdout.log'})")
            progress.console.print(f"{method} seed {seed}: " + (f"{seconds / 60:.1f} min" if seconds else "done before")
                                   + (f" FAILED exit {rc}" if rc else ""))
    if failed:
        sys.exit("failed runs: " + "; ".join(failed))
    runs = {m: [load_run(run_dir(Path(args.runs_dir), args.split, m, s)) for s in args.seeds] for m in args.methods}
    write_outputs(args, runs)


if __name__ == "__main__":
    main()
