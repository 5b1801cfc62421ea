#!/usr/bin/env python3
"""The paper in miniature, second edition: the second toy world's premise, then every method.

    python scripts/reproduce_toy.py                    # premise (validation) + study (test)
    python scripts/reproduce_toy.py --stage premise    # only the premise table (validation)
    python scripts/reproduce_toy.py --stage tune       # the protocol's tuning grid (validation)

Everything runs ``python train.py experiment=toy2_paper ...`` (the base is scored by the same evaluation code)
with one torch thread, ``--jobs`` at a time. Runs go to ``--runs-dir/<stage>/<name>/seed<s>`` and
are skipped once their ``summary.json`` holds every step, and a stopped run resumes from its last
checkpoint, so a stopped reproduction continues where it was. Outputs (``--out``, default
``docs/results``):

- ``toy2_premise.md`` (+ ``toy2_premise_curves.png``): P1-P4 of docs/results/toy2_protocol.md,
  each with the numbers it stands on, measured on the validation split;
- ``toy2_table.md``: accuracy per level on the test split, the paired difference ReLIFT minus
  each method with a 95% t interval, demonstrations used, response length, compute;
- ``toy2_curves.png``: test accuracy vs training step per method;
- ``toy2_capability_map.png``: per test question, which policies solve it;
- ``toy2_tuning.md`` (``--stage tune``): the grid of docs/results/toy2_protocol.md and what it chose.

The first edition (the first toy world, ``experiment=toy_paper``) is docs/results/toy_table.md,
produced by this script at commit ddffdd0.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "toy2_paper"
LEVELS = ["level1", "level2", "level3", "level4"]
EASY = LEVELS[:3]
SOLVED = 0.5
"""A question counts as solved by a policy when the mean share of correct samples is >= this."""
STEPS = 150
BATCH = 16
"""B prompts per training step (data.batch_size of experiment=toy2_paper); M = B."""

# -- settings chosen on the validation split (docs/results/toy2_tuning.md, by --stage tune under
# docs/results/toy2_protocol.md), before the test run. Hydra overrides on experiment=toy2_paper.
RL_LR = "algorithm.rl_optimizer.lr=1e-4"              # GRPO's choice; every RL method but LUFFY
LUFFY_RL_LR = "algorithm.rl_optimizer.lr=1e-4"        # LUFFY's own choice
SFT_LR = "algorithm.sft_optimizer.lr=1e-3"            # SFT's choice (also SFT-then-RL's SFT phase)
RELIFT_SFT_LR = "algorithm.sft_optimizer.lr=1e-4"     # ReLIFT's choice (also its ablations)
UNIFORM_INTERVAL = "algorithm.sft_interval=20"        # 150 / ReLIFT's 7.5 SFT steps on validation

METHODS: dict[str, list[str]] = {
    "grpo": ["algorithm=grpo", RL_LR],
    # SFT on every demonstration = SFT-then-RL whose warm-up is the whole run: the same code path
    # (batch order, the same optimizer), so its first half is bitwise SFT-then-RL's first half.
    "sft": ["algorithm=sft_then_rl", "algorithm.sft_warmup_steps={steps}", SFT_LR, RL_LR],
    "sft_then_rl": ["algorithm=sft_then_rl", "algorithm.sft_warmup_steps={half}", SFT_LR, RL_LR],
    "luffy": ["algorithm=luffy", LUFFY_RL_LR],
    "relift": ["algorithm=relift", RELIFT_SFT_LR, RL_LR],
    "relift_every_step": ["algorithm=relift_every_step", RELIFT_SFT_LR, RL_LR],
    "relift_uniform": ["algorithm=relift_uniform", UNIFORM_INTERVAL, RELIFT_SFT_LR, RL_LR],
    "relift_random_buffer": ["algorithm=relift_random_buffer", RELIFT_SFT_LR, RL_LR],
    "rl_with_sft_loss": ["algorithm=rl_with_sft_loss", RL_LR],
}
MAIN = ["grpo", "sft", "sft_then_rl", "luffy", "relift"]
ABLATIONS = ["relift_every_step", "relift_uniform", "relift_random_buffer", "rl_with_sft_loss"]
STUDY_SEEDS = {m: [0, 1, 2, 3, 4] for m in MAIN} | {m: [0, 1, 2] for m in ABLATIONS}
CAPABILITY_METHODS = MAIN
"""The policies drawn in the capability map (all with 5 seeds); its categories are over these."""

# -- the premise (docs/results/toy2_protocol.md), on the validation split, before any tuning.
PREMISE_SEEDS = [100, 101, 102]
PREMISE_SFT_LR = "algorithm.sft_optimizer.lr=5e-5"
PREMISE_RUNS: dict[str, list[str]] = {
    # P1: RL alone, the study's budget (the first toy world's RL rate; GRPO's own choice comes later).
    "grpo": ["algorithm=grpo", "algorithm.rl_optimizer.lr=2e-4"],
    # P2, P3: SFT on the hardest level's demonstrations alone, 40 steps of M=16 rows.
    "sft_level4": ["algorithm=sft", "data.train_rows.levels=[4]", PREMISE_SFT_LR, "max_steps=40",
                   "callbacks.evaluation.every_n_steps=10"],
    # P4: the same SFT on every level's demonstrations, the study's budget.
    "sft_all": ["algorithm=sft", PREMISE_SFT_LR],
}
BASE_K_PREMISE = 32
"""Samples per level-4 validation question the base is scored with for P1."""

# -- the tuning grid (docs/results/toy2_protocol.md): seeds, values, the metric that picks.
TUNE_SEEDS = [100, 101]
TUNE_GRID: dict[str, tuple[list[str], str, list[str]]] = {
    # name: (fixed overrides, the knob, its values); "{rl_lr}" = GRPO's choice (tuned first)
    "grpo": (["algorithm=grpo"], "algorithm.rl_optimizer.lr", ["1e-4", "2e-4", "4e-4"]),
    "luffy": (["algorithm=luffy"], "algorithm.rl_optimizer.lr", ["1e-4", "2e-4", "4e-4"]),
    "sft": (["algorithm=sft_then_rl", "algorithm.sft_warmup_steps={steps}"],
            "algorithm.sft_optimizer.lr", ["1e-4", "3e-4", "1e-3"]),
    "relift": (["algorithm=relift", "algorithm.rl_optimizer.lr={rl_lr}"],
               "algorithm.sft_optimizer.lr", ["3e-5", "1e-4", "3e-4"]),
}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093,
        29: 2.045}
"""Two-sided 95% quantiles of Student's t by degrees of freedom (t_{0.975, df})."""


# -- running -------------------------------------------------------------------------------------
@dataclass
class Job:
    stage: str
    name: str
    seed: int
    overrides: list[str]
    split: str
    steps: int = STEPS
    script: str = "train.py"  # or "score_base"

    @property
    def out(self) -> Path:
        return Path(ARGS.runs_dir) / self.stage / self.name / f"seed{self.seed}"


def expand(overrides: list[str], steps: int) -> list[str]:
    return [o.format(steps=steps, half=steps // 2) for o in overrides]


def train_command(job: Job) -> list[str]:
    sets = [f"data.eval_sets.{lvl}.split={job.split}" for lvl in LEVELS] if job.split != "test" else []
    return [
        sys.executable, str(ROOT / "train.py"), f"experiment={EXPERIMENT}",
        *expand(job.overrides, job.steps), *sets,
        f"seed={job.seed}", f"hydra.run.dir={job.out}", "logger=csv", "callbacks.progress_bar=null",
        *ARGS.overrides,
    ]


def steps_of(job: Job) -> int:
    """The run's max_steps (an override may set it)."""
    for o in reversed(expand(job.overrides, job.steps)):
        if o.startswith("max_steps="):
            return int(o.split("=")[1])
    return job.steps


def finished(job: Job) -> bool:
    if job.script == "score_base":
        return (job.out / "done").exists()
    summary = job.out / "summary.json"
    return summary.exists() and json.loads(summary.read_text())["steps"] >= steps_of(job)


def launch(job: Job) -> tuple[Job, float, int]:
    if finished(job):
        return job, 0.0, 0
    job.out.mkdir(parents=True, exist_ok=True)
    if job.script == "score_base":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--score-base", str(job.out), "--", *job.overrides]
    else:
        cmd = train_command(job)
        if any((job.out / "checkpoints").glob("*.ckpt")):  # a stopped run continues where it was
            cmd.append("ckpt_path=last")
    started = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(job.out / "stdout.log", "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    return job, time.time() - started, rc


def run_all(jobs: list[Job]) -> None:
    from rich.progress import Progress

    failed = []
    with Progress() as progress, ThreadPoolExecutor(ARGS.jobs) as pool:
        task = progress.add_task(f"{len(jobs)} runs", total=len(jobs))
        for job, seconds, rc in pool.map(launch, jobs):
            progress.advance(task)
            if rc:
                failed.append(f"{job.stage}/{job.name} seed {job.seed} (exit {rc}; see {job.out / 'stdout.log'})")
            progress.console.print(f"{job.stage}/{job.name} seed {job.seed}: "
                                   + (f"{seconds / 60:.1f} min" if seconds else "done before")
                                   + (f" FAILED exit {rc}" if rc else ""))
    if failed:
        sys.exit("failed runs: " + "; ".join(failed))


def build_base() -> None:
    """Builds (or finds) the cached toy base once, before parallel runs would race to build it."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import relift_pl.train  # noqa: F401  (registers the config's relift_root resolver)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={EXPERIMENT}", *ARGS.overrides])
    print(f"toy base: {instantiate(cfg.model.build)()}", flush=True)


def base_eval_job(stage: str, split: str, k: int, levels: list[str], n_per_level: int = 64) -> Job:
    """Scores the base (no training) with k samples per question, through the training runs'
    own evaluation code (``score_base`` in a subprocess), on the world's sets of ``levels``."""
    overrides = [f"data.eval_sets.{lvl}.split={split}" for lvl in levels]
    overrides += [f"data.eval_sets.{lvl}.n_per_level={n_per_level}" for lvl in levels]
    overrides += [f"~data.eval_sets.{lvl}" for lvl in LEVELS if lvl not in levels]
    overrides += [f"callbacks.evaluation.k={k}", *ARGS.overrides]
    return Job(stage, f"base_k{k}", 0, overrides, split, script="score_base")


def score_base(out: Path, overrides: list[str]) -> None:
    """Evaluates the untrained base as a run's step-0 evaluation does (``BenchmarkEvaluation``),
    with ``overrides``; writes ``eval/per_problem.jsonl`` (step 0) and ``done`` into ``out``."""
    from hydra import compose, initialize_config_dir

    import relift_pl.train  # noqa: F401  (registers the config's relift_root resolver)
    from callbacks.evaluation import BenchmarkEvaluation
    from relift_pl.train import build

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={EXPERIMENT}", "num_threads=1", "logger=csv",
                                          f"paths.output_dir={out}", *overrides])
    trainer, module, datamodule = build(cfg)
    evaluation = next(c for c in trainer.callbacks if isinstance(c, BenchmarkEvaluation))
    module.trainer = trainer
    module.setup("validate")
    datamodule.setup_eval_sets()
    try:
        scores = evaluation.evaluate(module, datamodule.eval_sets)
    finally:
        module.teardown("validate")
    (out / "eval").mkdir(parents=True, exist_ok=True)
    with open(out / "eval" / "per_problem.jsonl", "w") as f:
        for score in scores:
            f.write(json.dumps({"step": 0, "set": score.name, "k": score.k, "correct": score.per_problem,
                                "tokens": score.response_tokens}) + "\n")
    (out / "done").write_text("ok\n")


# -- reading runs --------------------------------------------------------------------------------
def load_run(path: Path) -> dict:
    """{"summary", "evals": {step: {set: {"correct": {id: share}, "tokens": {id: mean}}}},
    "metrics": {step: {key: value}}} of one run folder (a base-scoring folder has evals only)."""
    evals: dict[int, dict] = defaultdict(dict)
    for line in (path / "eval" / "per_problem.jsonl").read_text().splitlines():
        rec = json.loads(line)
        evals[rec["step"]][rec["set"]] = rec
    metrics: dict[int, dict[str, float]] = defaultdict(dict)
    csv_path = path / "csv" / "metrics.csv"
    if csv_path.exists():
        with open(csv_path) as f:
            for row in csv.DictReader(f):
                step = int(float(row["step"]))
                metrics[step].update({k: float(v) for k, v in row.items() if v != "" and k != "step"})
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    logged = {step for step, m in metrics.items() if "perf/trained_tokens" in m}
    missing = sorted(set(range(1, summary.get("steps", 0) + 1)) - logged)
    if summary and missing:  # the sums below would silently undercount
        raise SystemExit(f"{csv_path}: no step metrics for steps {missing[0]}..{missing[-1]} "
                         f"({len(missing)} of {summary['steps']}); delete {path} and run the script again")
    return {"summary": summary, "evals": dict(evals), "metrics": dict(metrics)}


def final_eval(run: dict) -> dict:
    return run["evals"][max(run["evals"])]


def accuracy(eval_at_step: dict, levels: list[str] = LEVELS) -> dict[str, float]:
    """Per level: mean over its questions of the share of samples correct (avg@k); "avg": the
    mean of the levels' accuracies (each level weighs the same, whatever its question count)."""
    acc = {s: statistics.fmean(eval_at_step[s]["correct"].values()) for s in levels}
    return acc | {"avg": statistics.fmean(acc[s] for s in levels)}


def response_tokens(eval_at_step: dict, levels: list[str] = LEVELS) -> dict[str, float]:
    """Per level: mean over its questions of the mean response length (tokens, EOS included as
    the engine counts it); "avg": the mean of the levels' means."""
    tok = {s: statistics.fmean(eval_at_step[s]["tokens"].values()) for s in levels}
    return tok | {"avg": statistics.fmean(tok[s] for s in levels)}


def per_question(eval_at_step: dict, field_name: str = "correct") -> dict[str, float]:
    return {q: v for s in LEVELS if s in eval_at_step for q, v in eval_at_step[s][field_name].items()}


def series(run: dict, key: str) -> list[tuple[int, float]]:
    """(step, value) of a logged metric, in step order."""
    return [(s, m[key]) for s, m in sorted(run["metrics"].items()) if key in m]


def demos_used_pct(run: dict) -> float:
    """Distinct demonstrations that entered an applied update / demonstrations available, %."""
    s = run["summary"]
    return 100.0 * s["demos_used"] / max(s["demos_available"], 1)


def row_updates(run: dict, batch: int = BATCH) -> int:
    """Demonstration rows that entered updates, counting a row again each time it is used.

    SFT steps: M = B rows each (buffer and interval schedules pop exactly M; SFT warm-up steps
    take the step's B prompts), except under ``sft_schedule: every_step``, which takes what the
    buffer holds (up to M): rows popped at a step = buffer before + rows pushed - buffer after,
    pushed = the step's hardest prompts (solve-none rate x B). LUFFY: the demonstrations mixed
    into rollout groups (``luffy/demos_mixed``). RL with SFT loss: B rows per RL step.
    """
    cfg = run.get("config", {})
    s = run["summary"]
    algo = cfg.get("algorithm", {})
    rows = 0
    if algo.get("mix_demos"):
        rows += int(round(sum(v for _, v in series(run, "luffy/demos_mixed"))))
    if algo.get("sft_loss_coef"):
        rows += s["rl_steps"] * batch
    if algo.get("sft_schedule") == "every_step" and algo.get("sft_enabled"):
        size = dict(series(run, "buffer/size"))
        none = dict(series(run, "train/solve_none_rate"))
        sft = dict(series(run, "train/sft_step"))
        prev_size, prev_sft = 0, 0
        for step in sorted(sft):
            pushed = int(round(none.get(step, 0.0) * batch))
            if sft[step] > prev_sft:
                rows += prev_size + pushed - int(size[step])
            prev_size, prev_sft = int(size[step]), sft[step]
    else:
        rows += s["sft_steps"] * batch
    return rows


def trained_tokens(run: dict) -> float:
    """Tokens through forward + backward passes of the updates, summed over the run: every RL
    step's rollouts (prompt + response, G per prompt), every SFT step's rows (prompt +
    demonstration) and, for RL with SFT loss, the demonstrations (prompt + demonstration) its SFT
    loss passes with every RL optimizer step: the module's ``perf/trained_tokens``."""
    return sum(v for _, v in series(run, "perf/trained_tokens"))


def generated_tokens(run: dict) -> float:
    """Tokens sampled by the training rollouts (forward only), summed over the run."""
    return sum(v for _, v in series(run, "perf/generated_tokens"))


# -- statistics ----------------------------------------------------------------------------------
def mean_std(values: list[float], digits: int = 1) -> str:
    """"mean ± sample std" (n - 1 in the denominator); the std is 0.0 for one value."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired_interval(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """Mean of a[s] - b[s] over the seeds both have, and its 95% t interval:
    mean ± t_{0.975, n-1} x sample std / sqrt(n). (nan bounds below two seeds.)"""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, math.nan, math.nan, n
    half = T975[n - 1] * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def fmt_interval(mean: float, lo: float, hi: float) -> str:
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"


# -- the study table -----------------------------------------------------------------------------
def per_seed(runs: dict[int, dict], fn) -> dict[int, float]:
    return {seed: fn(run) for seed, run in runs.items()}


def table(runs: dict[str, dict[int, dict]], base: dict | None = None, reference: str = "relift") -> str:
    """The study table: one row per method, mean ± std over its seeds of the final evaluation."""
    head = ["method", "seeds", *LEVELS, "avg", f"{reference} − method (avg)", "demos used %",
            "row-updates", "response tokens", "RL / SFT steps", "fwd+bwd tokens (M)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base is not None:
        acc, tok = accuracy(base), response_tokens(base)
        lines.append("| base | - | " + " | ".join(f"{acc[s] * 100:.1f}" for s in [*LEVELS, "avg"])
                     + f" | - | 0 | 0 | {tok['avg']:.1f} | 0 / 0 | 0 |")
    ref_avg = per_seed(runs[reference], lambda r: accuracy(final_eval(r))["avg"] * 100) if reference in runs else {}
    for method, seeds in runs.items():
        finals = {s: accuracy(final_eval(r)) for s, r in seeds.items()}
        cells = [str(len(seeds))]
        cells += [mean_std([f[key] * 100 for f in finals.values()]) for key in [*LEVELS, "avg"]]
        if method == reference or not ref_avg:
            cells.append("-")
        else:
            cells.append(fmt_interval(*paired_interval(ref_avg, {s: f["avg"] * 100 for s, f in finals.items()})[:3]))
        cells.append(mean_std([demos_used_pct(r) for r in seeds.values()]))
        cells.append(f"{statistics.fmean(row_updates(r) for r in seeds.values()):.0f}")
        cells.append(mean_std([response_tokens(final_eval(r))["avg"] for r in seeds.values()]))
        rl = sorted({r["summary"]["rl_steps"] for r in seeds.values()})
        sft = sorted({r["summary"]["sft_steps"] for r in seeds.values()})
        cells.append("/".join(map(str, rl)) + " / " + (f"{min(sft)}-{max(sft)}" if len(sft) > 1 else str(sft[0])))
        cells.append(f"{statistics.fmean(trained_tokens(r) for r in seeds.values()) / 1e6:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(runs: dict[str, dict[int, dict]], reference: str = "relift") -> str:
    """ReLIFT minus each method, per level and on the average, in points, with 95% t intervals."""
    head = ["method", "paired seeds", *[f"Δ {s}" for s in LEVELS], "Δ avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = {s: accuracy(final_eval(r)) for s, r in runs[reference].items()}
    for method, seeds in runs.items():
        if method == reference:
            continue
        other = {s: accuracy(final_eval(r)) for s, r in seeds.items()}
        cells = []
        for key in [*LEVELS, "avg"]:
            mean, lo, hi, n = paired_interval({s: v[key] * 100 for s, v in ref.items()},
                                              {s: v[key] * 100 for s, v in other.items()})
            cells.append(fmt_interval(mean, lo, hi))
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tokens_table(runs: dict[str, dict[int, dict]], base: dict | None = None) -> str:
    head = ["method", *LEVELS, "avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base is not None:
        tok = response_tokens(base)
        lines.append("| base | " + " | ".join(f"{tok[k]:.1f}" for k in [*LEVELS, "avg"]) + " |")
    for method, seeds in runs.items():
        toks = [response_tokens(final_eval(r)) for r in seeds.values()]
        lines.append(f"| {method} | " + " | ".join(mean_std([t[k] for t in toks]) for k in [*LEVELS, "avg"]) + " |")
    return "\n".join(lines)


# -- the capability map --------------------------------------------------------------------------
CATEGORIES = {
    "solved by the base": "#9ecae1",
    "learned by GRPO": "#31a354",
    "learned only by methods with demonstrations": "#e6550d",
    "learned by no method shown": "#d9d9d9",
}


def mean_shares(runs: dict[int, dict]) -> dict[str, float]:
    """Question id -> share of correct samples at the final evaluation, averaged over seeds."""
    per = [per_question(final_eval(r)) for r in runs.values()]
    return {q: statistics.fmean(d[q] for d in per) for q in per[0]}


def capability(base: dict[str, float], finals: dict[str, dict[str, float]], threshold: float = SOLVED):
    """Each question's category over the base and every method in ``finals`` (all shown):

    solved by the base (base share >= threshold); else learned by GRPO (GRPO's mean share >=
    threshold); else learned only by methods with demonstrations (some other method shown reaches
    it); else learned by no method shown. Also per method: solved, learned (not solved by the
    base) and lost (solved by the base, not by the method) question counts.
    """
    category = {}
    for q, share in base.items():
        if share >= threshold:
            category[q] = "solved by the base"
        elif finals.get("grpo", {}).get(q, 0.0) >= threshold:
            category[q] = "learned by GRPO"
        elif any(f.get(q, 0.0) >= threshold for m, f in finals.items() if m != "grpo"):
            category[q] = "learned only by methods with demonstrations"
        else:
            category[q] = "learned by no method shown"
    counts = {}
    for method, f in finals.items():
        solved = {q for q in base if f.get(q, 0.0) >= threshold}
        base_solved = {q for q in base if base[q] >= threshold}
        counts[method] = {"solved": len(solved), "learned": len(solved - base_solved),
                          "lost": len(base_solved - solved)}
    return category, counts


def level_of(eval_at_step: dict) -> dict[str, str]:
    return {q: s for s in LEVELS for q in eval_at_step[s]["correct"]}


def capability_tables(category: dict[str, str], counts: dict[str, dict[str, int]], levels: dict[str, str],
                      per_level_counts: dict[str, dict[str, dict[str, int]]]) -> str:
    lines = ["| level | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(CATEGORIES)]
    for s in LEVELS:
        qs = [q for q in category if levels[q] == s]
        lines.append(f"| {s} | " + " | ".join(str(sum(category[q] == c for q in qs)) for c in CATEGORIES) + " |")
    lines += ["", "| method | " + " | ".join(f"{s} solved / learned / lost" for s in LEVELS) + " |",
              "|---|" + "---|" * len(LEVELS)]
    for method in counts:
        lines.append(f"| {method} | " + " | ".join(
            "{solved} / {learned} / {lost}".format(**per_level_counts[method][s]) for s in LEVELS) + " |")
    return "\n".join(lines)


def plot_capability(base: dict[str, float], finals: dict[str, dict[str, float]], levels: dict[str, str],
                    path: Path, samples: str, split_name: str = "test") -> tuple[dict, dict, dict]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

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


def plot_curves(runs: dict[str, dict[int, dict]], path: Path, split_name: str, k: int = 4) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 6, figsize=(26, 4.2))
    for method, seeds in runs.items():
        rs = list(seeds.values())
        steps = sorted(set.intersection(*(set(r["evals"]) for r in rs)))
        style = "-" if method in MAIN else "--"
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


# -- the premise ---------------------------------------------------------------------------------
def premise_text(runs: dict[str, dict[int, dict]], base_eval: dict | None, base_k: int) -> str:
    """P1-P4 (docs/results/toy2_protocol.md states the bars), each from its runs' numbers."""
    def at(run, step):  # the evaluation at a step
        return run["evals"][step]

    base0 = next(iter(runs["grpo"].values()))["evals"][0]  # step 0: the base, avg@4
    b = accuracy(base0)
    lines = []
    # P1
    g_final = [accuracy(final_eval(r))["level4"] * 100 for r in runs["grpo"].values()]
    g_max = max(accuracy(e)["level4"] * 100 for r in runs["grpo"].values() for t, e in r["evals"].items() if t > 0)
    correct, total = 0, 0
    if base_eval is not None:
        shares = base_eval["level4"]["correct"]
        correct, total = round(sum(shares.values()) * base_k), len(shares) * base_k
        base_line = (f"{correct} correct of {total} samples ({len(shares)} level-4 validation "
                     f"questions x {base_k}, T=1)")
    else:
        base_line = "(base evaluation missing)"
    p1 = total > 0 and correct / total <= 0.001 and g_max <= 1.0
    lines.append(("P1", "beyond reach", "at most 0.1% of the base's level-4 samples correct, and GRPO's "
                  f"level-4 accuracy <= 1% at every evaluation of every seed ({STEPS} steps)",
                  f"base: {base_line}; GRPO ({len(g_final)} seeds): level 4 {mean_std(g_final)}% at step "
                  f"{max(next(iter(runs['grpo'].values()))['evals'])}, highest at any evaluation {g_max:.1f}%", p1))
    # P2, P3
    sl = runs["sft_level4"]
    fin = [accuracy(final_eval(r)) for r in sl.values()]
    steps = max(next(iter(sl.values()))["evals"])
    l4 = [f["level4"] * 100 for f in fin]
    p2 = statistics.fmean(l4) >= 50.0
    lines.append(("P2", "learnable from demonstrations", "level-4 accuracy >= 50% after SFT on the "
                  f"level-4 demonstrations alone, {steps} SFT steps of {BATCH} rows (mean over seeds)",
                  f"level 4: base {b['level4'] * 100:.1f}% -> {mean_std(l4)}% ({len(l4)} seeds)", p2))
    drops = {s: [(f[s] - b[s]) * 100 for f in fin] for s in EASY}
    p3 = all(statistics.fmean(d) >= -5.0 for d in drops.values())
    lines.append(("P3", "orthogonal", f"each of levels 1-3 at step {steps} at most 5 points below the base "
                  "(mean over seeds)",
                  "; ".join(f"{s}: {b[s] * 100:.1f} -> {mean_std([f[s] * 100 for f in fin])} "
                            f"({statistics.fmean(drops[s]):+.1f})" for s in EASY), p3))
    # P4
    sa = runs["sft_all"]
    tok_all = [response_tokens(final_eval(r), EASY) for r in sa.values()]
    tok_l4 = [response_tokens(final_eval(r), EASY) for r in sl.values()]
    tok_g = [response_tokens(final_eval(r), EASY) for r in runs["grpo"].values()]
    base_easy = response_tokens(base0, EASY)["avg"]
    ratio = statistics.fmean(t["avg"] for t in tok_all) / base_easy
    p4 = ratio >= 1.5
    acc_all = [accuracy(final_eval(r)) for r in sa.values()]
    lines.append(("P4", "imitation everywhere costs", "mean response tokens on levels 1-3 >= 1.5x the "
                  f"base's after SFT on every level's demonstrations (same lr, {STEPS} steps); the "
                  "accuracy it leaves is reported, not barred",
                  f"levels 1-3 response tokens: base {base_easy:.1f}; SFT on all "
                  f"{mean_std([t['avg'] for t in tok_all])} ({ratio:.2f}x); SFT on level 4 only "
                  f"{mean_std([t['avg'] for t in tok_l4])}; GRPO {mean_std([t['avg'] for t in tok_g])}. "
                  "Accuracy after SFT on all: " + ", ".join(
                      f"{s} {mean_std([a[s] * 100 for a in acc_all])}" for s in LEVELS), p4))
    out = ["| premise | what | bar (set before the runs) | measured (validation) | holds |",
           "|---|---|---|---|---|"]
    out += [f"| {p} | {what} | {bar} | {measured} | {'yes' if ok else 'NO'} |"
            for p, what, bar, measured, ok in lines]
    detail = ["", "Per level, mean ± sample std over the premise seeds "
              f"({', '.join(map(str, PREMISE_SEEDS))}), validation questions, avg@4 at T=1:", "",
              "| run | step | " + " | ".join(LEVELS) + " | avg | response tokens (levels 1-3) |",
              "|---|---|" + "---|" * (len(LEVELS) + 2)]
    detail.append("| base | 0 | " + " | ".join(f"{b[s] * 100:.1f}" for s in LEVELS)
                  + f" | {b['avg'] * 100:.1f} | {base_easy:.1f} |")
    for name, seeds in runs.items():
        fins = [accuracy(final_eval(r)) for r in seeds.values()]
        toks = [response_tokens(final_eval(r), EASY)["avg"] for r in seeds.values()]
        step = max(next(iter(seeds.values()))["evals"])
        detail.append(f"| {name} | {step} | " + " | ".join(mean_std([f[s] * 100 for f in fins]) for s in [*LEVELS, "avg"])
                      + f" | {mean_std(toks)} |")
    return "\n".join(out + detail)


# -- stages --------------------------------------------------------------------------------------
def premise_stage() -> None:
    base_job = base_eval_job("premise", "val", BASE_K_PREMISE, ["level4"], n_per_level=10_000)
    jobs = [base_job] + [Job("premise", name, seed, ov, "val") for name, ov in PREMISE_RUNS.items()
                         for seed in PREMISE_SEEDS]
    run_all(jobs)
    runs = {name: {seed: load_run(Job("premise", name, seed, ov, "val").out) for seed in PREMISE_SEEDS}
            for name, ov in PREMISE_RUNS.items()}
    base = load_run(base_job.out)["evals"]
    base_eval = base[max(base)] if base else None
    out = Path(ARGS.out)
    text = ["# The second toy world: the premise, measured (validation split)", "",
            "`python scripts/reproduce_toy.py --stage premise` (also the first stage of the full run). "
            "The bars were written in docs/results/toy2_protocol.md before these runs. "
            "± is the sample standard deviation over the seeds.", "",
            premise_text(runs, base_eval, BASE_K_PREMISE), "",
            "![premise curves](toy2_premise_curves.png)", ""]
    plot_curves(runs, out / "toy2_premise_curves.png", "validation")
    (out / "toy2_premise.md").write_text("\n".join(text))
    print("\n".join(text))


def study_stage() -> None:
    base_job = base_eval_job("study", "test", 4 * len(STUDY_SEEDS["relift"]), LEVELS)
    jobs = [base_job] + [Job("study", m, s, METHODS[m], "test") for s in range(5) for m in METHODS
                         if s in STUDY_SEEDS[m] and m in ARGS.methods]
    run_all(jobs)
    runs = {m: {s: load_run(Job("study", m, s, METHODS[m], "test").out) for s in STUDY_SEEDS[m]}
            for m in METHODS if m in ARGS.methods}
    for m, seeds in runs.items():
        for s, r in seeds.items():
            r["config"] = run_config(Job("study", m, s, METHODS[m], "test").out)
    base_runs = load_run(base_job.out)["evals"]
    base = base_runs[max(base_runs)]
    write_study(runs, base, k_base=4 * len(STUDY_SEEDS["relift"]))


def run_config(path: Path) -> dict:
    """The run's composed config (Hydra's .hydra/config.yaml), as plain data."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"), resolve=False)


def write_study(runs: dict[str, dict[int, dict]], base: dict, k_base: int) -> None:
    out = Path(ARGS.out)
    levels = level_of(base)
    shown = {m: mean_shares(runs[m]) for m in CAPABILITY_METHODS if m in runs}
    n_seeds = {m: len(runs[m]) for m in shown}
    samples = f"base: {k_base} samples; methods: 4 samples x {'/'.join(sorted({str(n) for n in n_seeds.values()}))} seeds, mean"
    category, counts, per_level = plot_capability(per_question(base), shown, levels,
                                                  out / "toy2_capability_map.png", samples)
    plot_curves(runs, out / "toy2_curves.png", "test")
    text = [
        "# The paper in miniature, second edition: every method on the second toy world (test split)", "",
        "`python scripts/reproduce_toy.py` (protocol: docs/results/toy2_protocol.md; settings: "
        "docs/results/toy2_tuning.md; premise: docs/results/toy2_premise.md; how the committed results "
        "were run: docs/results/toy2_study_log.md).", "",
        f"Accuracy = avg@4 (% of 4 samples at T=1 correct) on the test questions of each level after "
        f"{STEPS} training steps; avg = mean of the four levels. Cells are mean ± sample std over the "
        "method's seeds (n in the seeds column). The base row is the base scored once with "
        f"{k_base} samples per question (avg@{k_base}). ReLIFT − method: mean over the seeds both ran "
        "(same seed = same prompts in the same order) of the difference of their avg, with a 95% t "
        "interval over those paired differences (mean ± t(0.975, n−1) · sd / √n). Demos used = "
        "distinct demonstrations that entered an applied update / all training demonstrations; "
        "row-updates = demonstration rows summed over updates (a row counts each time it is used), "
        "mean over seeds. Response tokens = mean response length at the final evaluation (mean of "
        "the levels' means). fwd+bwd tokens = tokens through the updates' forward and backward "
        "passes (RL: prompt + response of every rollout; SFT: prompt + demonstration), mean over seeds.", "",
        table(runs, base), "",
        "ReLIFT minus each method, per level (points, 95% t interval over paired seeds):", "",
        paired_table(runs), "",
        "Response tokens per level at the final evaluation (mean ± sample std over seeds):", "",
        tokens_table(runs, base), "",
        f"Capability map: a question is solved by a policy when its share of correct samples is >= {SOLVED:g} "
        f"({samples}). Categories are over the base and all methods drawn ({', '.join(shown)}), "
        "first match: solved by the base; learned by GRPO; learned only by methods with "
        "demonstrations (some other method drawn solves it); learned by no method shown.", "",
        capability_tables(category, counts, levels, per_level), "",
        "![accuracy vs training step](toy2_curves.png)", "", "![capability map](toy2_capability_map.png)", "",
    ]
    (out / "toy2_table.md").write_text("\n".join(text))
    print("\n".join(text))


def tune_job(name: str, value: str, seed: int, rl_lr: str = "") -> Job:
    fixed, knob, _ = TUNE_GRID[name]
    overrides = [o.replace("{rl_lr}", rl_lr) for o in fixed] + [f"{knob}={value}"]
    return Job("tune", f"{name}_{value}", seed, overrides, "val")


def edge_value(values: list[str], best: str) -> str | None:
    """The value beyond the grid's edge the winner sits on (x3 or /3), or None when inside."""
    def short(x: float) -> str:  # 0.0012 -> "1.2e-3", 0.0003 -> "3e-4"
        mantissa, exponent = f"{x:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"

    ordered = sorted(values, key=float)
    if best == ordered[-1]:
        return short(float(best) * 3)
    if best == ordered[0]:
        return short(float(best) / 3)
    return None


def tune_scores(name: str, values: list[str], rl_lr: str = "") -> dict[str, float]:
    return {v: statistics.fmean(accuracy(final_eval(load_run(tune_job(name, v, s, rl_lr).out)))["avg"]
                                for s in TUNE_SEEDS) for v in values}


def tune(names: list[str], rl_lr: str = "") -> dict[str, tuple[list[str], str]]:
    """Runs each grid, extends it once past an edge winner, returns {name: (values, winner)}."""
    run_all([tune_job(n, v, s, rl_lr) for n in names for v in TUNE_GRID[n][2] for s in TUNE_SEEDS])
    grids = {n: list(TUNE_GRID[n][2]) for n in names}
    extra = {}
    for n in names:
        scores = tune_scores(n, grids[n], rl_lr)
        beyond = edge_value(grids[n], max(scores, key=scores.get))
        if beyond:
            extra[n] = beyond
    run_all([tune_job(n, v, s, rl_lr) for n, v in extra.items() for s in TUNE_SEEDS])
    out = {}
    for n in names:
        values = sorted(grids[n] + ([extra[n]] if n in extra else []), key=float)
        scores = tune_scores(n, values, rl_lr)
        out[n] = (values, max(scores, key=scores.get))
    return out


def tune_stage() -> None:
    chosen = tune(["grpo", "luffy", "sft"])
    rl_lr = chosen["grpo"][1]
    chosen |= tune(["relift"], rl_lr)
    lines = ["| method | knob | value | seeds | " + " | ".join(LEVELS) + " | avg (picks) | RL / SFT steps |",
             "|---|---|---|---|" + "---|" * (len(LEVELS) + 2)]
    for name, (values, best) in chosen.items():
        knob = TUNE_GRID[name][1]
        for value in values:
            rs = [load_run(tune_job(name, value, s, rl_lr).out) for s in TUNE_SEEDS]
            fins = [accuracy(final_eval(r)) for r in rs]
            steps = ", ".join(f"{r['summary']['rl_steps']} / {r['summary']['sft_steps']}" for r in rs)
            mark = "**" if value == best else ""
            lines.append(f"| {name} | {knob} | {mark}{value}{mark} | {len(rs)} | "
                         + " | ".join(mean_std([f[s] * 100 for f in fins]) for s in [*LEVELS, "avg"])
                         + f" | {steps} |")
    relift_sft = [load_run(tune_job("relift", chosen["relift"][1], s, rl_lr).out)["summary"]["sft_steps"]
                  for s in TUNE_SEEDS]
    interval = round(STEPS / statistics.fmean(relift_sft))
    text = "\n".join([
        "Tuning grid (validation split, seeds " + ", ".join(map(str, TUNE_SEEDS)) + ", 150 steps; "
        "cells: mean ± sample std over the seeds at step 150; bold: the winner by the mean avg). "
        f"ReLIFT ran with GRPO's chosen RL lr {rl_lr}.", "", *lines, "",
        f"ReLIFT's SFT steps at its chosen lr: {relift_sft} -> relift_uniform interval "
        f"round({STEPS} / {statistics.fmean(relift_sft):.1f}) = {interval}.", ""])
    (Path(ARGS.out) / "toy2_tuning_grid.md").write_text(text)
    print(text)


ARGS: argparse.Namespace


def main(argv=None) -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="all", choices=["all", "premise", "study", "tune"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    ap.add_argument("--runs-dir", default=str(ROOT / ".cache" / "reproduce_toy2"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    ap.add_argument("--score-base", default=None, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    ARGS = ap.parse_args(argv)
    if ARGS.score_base:  # a subprocess of the stages: the base's evaluation
        score_base(Path(ARGS.score_base), ARGS.rest)
        return
    Path(ARGS.out).mkdir(parents=True, exist_ok=True)
    started = time.time()
    build_base()
    if ARGS.stage in ("all", "premise"):
        premise_stage()
    if ARGS.stage == "tune":
        tune_stage()
    if ARGS.stage in ("all", "study"):
        study_stage()
    print(f"total wall time {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
