#!/usr/bin/env python3
"""The paper in miniature, third edition: the premise on four bases, the tuning, every method.

    python scripts/reproduce_toy.py                    # premise (validation) + study (test)
    python scripts/reproduce_toy.py --stage premise    # only the premise (validation, every base)
    python scripts/reproduce_toy.py --stage tune       # the protocol's tuning grid (validation)
    python scripts/reproduce_toy.py --stage study      # only the study (test)

The protocol is docs/results/toy2_protocol.md. Every run is ``python train.py
experiment=toy2_paper ...`` with one torch thread, ``--jobs`` at a time (bases are scored by the
runs' own evaluation code); runs go to ``--runs-dir/<stage>/<base>/<name>/seed<s>``, a finished
run is skipped and a stopped one resumes, so a stopped reproduction continues where it was.
Outputs (``--out``, default docs/results):

- ``toy2_premise.md`` (+ ``toy2_premise_curves.png``, ``toy2_bases.png``): P1-P3 on every base,
  P1-P4 on the shipped one, LUFFY's level-4 learning, measured on the validation split;
- ``toy2_tuning_grid.md`` (``--stage tune``): the grid and what it chose;
- ``toy2_table.md`` (+ ``toy2_curves.png``, ``toy2_capability_map.png``): the study on the test
  split, the robustness table on two other bases, what LUFFY's demonstrations weigh on each.

The machinery (running, reading, statistics, tables, figures) is ``relift_pl/study/``. The first
edition is docs/results/toy_table.md (commit ddffdd0), the second toy2_*.md at commit 5601b87.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relift_pl.study import plots, tables  # noqa: E402
from relift_pl.study.runs import Base, Job, load_run, run_all, run_config  # noqa: E402
from relift_pl.study.stats import (  # noqa: E402
    LEVELS,
    SOLVED,
    accuracy,
    final_eval,
    level_of,
    mean_shares,
    mean_std,
    per_question,
)

EXPERIMENT = "toy2_paper"
STEPS = 150
BATCH = 16
"""B prompts per training step (data.batch_size of experiment=toy2_paper); M = B."""

BASES = {
    "shipped": Base(),
    "seed1": Base(("model.build.seed=1",)),
    "seed2": Base(("model.build.seed=2",)),
    # The shipped base's settings built with PyTorch's own (ATen) vectorised kernels at AVX2
    # instead of AVX-512: another float path, as another CPU takes (matrix products still go
    # through the same BLAS / oneDNN kernels, so not any given machine's). Its own cache folder,
    # and every run on it with the same kernels.
    "avx2": Base(("model.build.rebuild=true", f"paths.cache_dir={ROOT / '.cache' / 'avx2'}"),
                 (("ATEN_CPU_CAPABILITY", "avx2"),)),
}
ROBUSTNESS_BASES = ["seed1", "avx2"]
ROBUSTNESS_METHODS = ["relift", "grpo", "luffy"]

# -- settings chosen on the validation split (docs/results/toy2_tuning_grid.md, by --stage tune
# under docs/results/toy2_protocol.md), before the test run. Hydra overrides on toy2_paper.
RL_LR = "algorithm.rl_optimizer.lr=2e-4"              # GRPO's choice; every RL method but LUFFY
LUFFY_RL_LR = "algorithm.rl_optimizer.lr=1e-4"        # LUFFY's own choice
SFT_LR = "algorithm.sft_optimizer.lr=1e-3"            # SFT's choice (also SFT-then-RL's SFT phase)
RELIFT_SFT_LR = "algorithm.sft_optimizer.lr=3e-4"     # ReLIFT's choice (also its ablations)
UNIFORM_INTERVAL = "algorithm.sft_interval=17"        # 150 / ReLIFT's SFT steps on validation

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
ROBUSTNESS_SEEDS = [0, 1, 2]
BASE_K_STUDY = 20
"""Samples per test question the bases are scored with (4 samples x 5 seeds)."""

# -- the premise (docs/results/toy2_protocol.md), on the validation split, before any tuning.
PREMISE_SEED = 100
"""The seed of every base's premise runs; GRPO on every base, and the shipped base's runs, add
PREMISE_SEEDS (P1 on one draw of RL's samples is one draw: on build seed 1, GRPO seed 100 never
answered level 4 and the study's seed 2 learned it)."""
PREMISE_SEEDS = [100, 101, 102]
PREMISE_RL_LR = "algorithm.rl_optimizer.lr=2e-4"
PREMISE_SFT_LR = "algorithm.sft_optimizer.lr=1e-4"
PREMISE_RUNS: dict[str, list[str]] = {
    # P1: RL alone, the study's budget, at a higher rate than the study's.
    "grpo": ["algorithm=grpo", PREMISE_RL_LR],
    # Reported: RL with the demonstrations mixed into its groups (policy shaping).
    "luffy": ["algorithm=luffy", PREMISE_RL_LR],
    # P2, P3: SFT on the hardest level's demonstrations alone, 40 steps of M=16 rows.
    "sft_level4": ["algorithm=sft", "data.train_rows.levels=[4]", PREMISE_SFT_LR, "max_steps=40",
                   "callbacks.evaluation.every_n_steps=10"],
    # P4 (shipped base): the same SFT on every level's demonstrations, the study's budget.
    "sft_all": ["algorithm=sft", PREMISE_SFT_LR],
}
EVERY_BASE = ["grpo", "luffy", "sft_level4"]
EVERY_BASE_SEEDS = {"grpo": PREMISE_SEEDS, "luffy": [PREMISE_SEED], "sft_level4": [PREMISE_SEED]}
RL_RUNS = ["grpo", "luffy"]
"""The premise runs whose checkpoints are scored for the key tokens."""
SHIPPED_ONLY_SEEDS = ["grpo", "sft_level4", "sft_all"]
BASE_K_PREMISE = 32
"""Samples per level-4 validation question each base is scored with for P1."""

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


# -- jobs ------------------------------------------------------------------------------------------
def job(stage: str, base: str, name: str, seed: int, overrides: list[str], split: str) -> Job:
    return Job(Path(ARGS.runs_dir) / stage / base / name / f"seed{seed}", EXPERIMENT, overrides,
               BASES[base], split, seed, STEPS, extra=ARGS.overrides)


def base_task(stage: str, base: str, task: str, overrides: list[str] = ()) -> Job:
    """A task on the base alone (built, scored, its key tokens)."""
    return Job(Path(ARGS.runs_dir) / stage / base / task, EXPERIMENT, list(overrides), BASES[base],
               task=task, extra=ARGS.overrides)


def score_base_task(stage: str, base: str, split: str, k: int, levels: list[str], n_per_level: int = 64) -> Job:
    """The base scored with k samples per question on ``levels`` of ``split``."""
    overrides = [f"data.eval_sets.{lvl}.split={split}" for lvl in levels]
    overrides += [f"data.eval_sets.{lvl}.n_per_level={n_per_level}" for lvl in levels]
    overrides += [f"~data.eval_sets.{lvl}" for lvl in LEVELS if lvl not in levels]
    overrides += [f"callbacks.evaluation.k={k}"]
    job = base_task(stage, base, "score_base", overrides)
    job.out = job.out.with_name(f"score_base_k{k}")
    return job


def build_bases(bases: list[str]) -> None:
    """Each base once, before parallel runs would race to build it."""
    run_all([base_task("bases", b, "build_base") for b in bases], ARGS.jobs)


def load_eval(job: Job) -> dict:
    evals = load_run(job.out)["evals"]
    return evals[max(evals)]


# -- the premise -----------------------------------------------------------------------------------
def premise_stage() -> None:
    build_bases(list(BASES))
    per_base = {b: {"key_tokens": base_task("premise", b, "key_tokens"),
                    "score": score_base_task("premise", b, "val", BASE_K_PREMISE, ["level4"], 10_000),
                    "runs": {n: {s: job("premise", b, n, s, PREMISE_RUNS[n], "val") for s in EVERY_BASE_SEEDS[n]}
                             for n in EVERY_BASE}}
                for b in BASES}
    shipped = {n: {s: job("premise", "shipped", n, s, PREMISE_RUNS[n], "val") for s in PREMISE_SEEDS}
               for n in SHIPPED_ONLY_SEEDS}
    # Seed-major order, as the study's: a stopped premise has every base at the seeds it finished.
    jobs = [j for b in per_base.values() for j in (b["key_tokens"], b["score"])]
    jobs += [by_seed[s] for s in PREMISE_SEEDS for b in per_base.values() for by_seed in b["runs"].values()
             if s in by_seed]
    jobs += [j for by_seed in shipped.values() for j in by_seed.values() if j not in jobs]
    run_all(jobs, ARGS.jobs)
    # The key tokens under RL's policies, from each run's checkpoints (every 25 steps).
    curves = {b: {n: Job(p["runs"][n][PREMISE_SEED].out / "key_tokens", EXPERIMENT, [], BASES[b],
                         task="key_token_curve", extra=ARGS.overrides) for n in RL_RUNS}
              for b, p in per_base.items()}
    run_all([j for by_run in curves.values() for j in by_run.values()], ARGS.jobs)
    bases = {b: {"base_eval": load_eval(p["score"]), "base_k": BASE_K_PREMISE,
                 "key_tokens": json.loads((p["key_tokens"].out / "key_tokens.json").read_text()),
                 "runs": {n: {s: load_run(j.out) for s, j in by_seed.items()} for n, by_seed in p["runs"].items()}}
             for b, p in per_base.items()}
    first_seed = {b: {n: by_seed[PREMISE_SEED] for n, by_seed in v["runs"].items()} for b, v in bases.items()}
    shipped_runs = {n: {s: load_run(j.out) for s, j in by_seed.items()} for n, by_seed in shipped.items()}
    out = Path(ARGS.out)
    plots.plot_curves(shipped_runs, out / "toy2_premise_curves.png", "validation", main=list(shipped_runs))
    plots.plot_bases(first_seed, out / "toy2_bases.png")
    text = [
        "# The paper in miniature, third edition: the premise, measured (validation split)", "",
        "`python scripts/reproduce_toy.py --stage premise` (also the first stage of the full run). "
        "The bars were written in docs/results/toy2_protocol.md before these runs, but for GRPO's "
        "seeds 101-102 on the bases other than the shipped one, added after the study's test runs "
        "(docs/results/toy2_study_log.md). The bases: "
        "shipped (`model=tiny2`, build seed 0, the development machine), seed1 and seed2 (build "
        "seeds 1 and 2), avx2 (build seed 0 with PyTorch's ATen kernels at AVX2 instead of AVX-512 "
        "(`ATEN_CPU_CAPABILITY=avx2`; BLAS / oneDNN matrix products unchanged): another float "
        "path, its runs too).", "",
        f"## On every base (seed {PREMISE_SEED}; GRPO seeds {', '.join(map(str, PREMISE_SEEDS))})", "",
        f"Level-4 samples: the base scored with {BASE_K_PREMISE} samples (T=1) on each level-4 "
        "validation question. Demo tokens: each level-4 validation demonstration teacher-forced "
        "through the base, the probability of its least and second least likely token (median / "
        "max over the demonstrations). GRPO and LUFFY: RL lr 2e-4, 150 steps, evaluated every 25 "
        "(highest level-4 accuracy at any evaluation; GRPO: per seed, and P1 asks it of every "
        "seed). SFT on level 4: lr 1e-4, 40 steps of 16 rows; levels 1-3 at step 40 minus the "
        "base, points.", "",
        tables.bases_table(bases), "",
        "![level 4 on every base](toy2_bases.png)", "",
        "## On the shipped base (seeds 100, 101, 102)", "",
        "± is the sample standard deviation over the seeds.", "",
        tables.premise_table(shipped_runs, bases["shipped"]["base_eval"], BASE_K_PREMISE, BATCH), "",
        "![premise curves](toy2_premise_curves.png)", "",
        "## What LUFFY's demonstrations contribute (seed 100, every base)", "",
        "Logged during training: the demonstrations LUFFY mixes into each step's groups (every "
        "level's), so the last three columns mostly speak of levels 1-3.", "",
        tables.luffy_table({b: runs["luffy"] for b, runs in first_seed.items()}), "",
        "## The level-4 demonstrations' key tokens under RL (seed 100, every base)", "",
        "Each checkpoint's policy teacher-forced through the level-4 validation demonstrations, as "
        "the bases are above: median probability of each demonstration's least / second least "
        "likely token.", "",
        tables.key_token_table({b: v["key_tokens"] for b, v in bases.items()},
                               {b: {n: {int(t): k for t, k in json.loads(
                                   (j.out / "key_tokens_by_step.json").read_text()).items()}
                                    for n, j in by_run.items()} for b, by_run in curves.items()}), "",
    ]
    (out / "toy2_premise.md").write_text("\n".join(text))
    print("\n".join(text))


# -- the tuning ------------------------------------------------------------------------------------
def tune_job(name: str, value: str, seed: int, rl_lr: str = "") -> Job:
    fixed, knob, _ = TUNE_GRID[name]
    overrides = [o.replace("{rl_lr}", rl_lr) for o in fixed] + [f"{knob}={value}"]
    return job("tune", "shipped", f"{name}_{value}", seed, overrides, "val")


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
    run_all([tune_job(n, v, s, rl_lr) for n in names for v in TUNE_GRID[n][2] for s in TUNE_SEEDS], ARGS.jobs)
    grids = {n: list(TUNE_GRID[n][2]) for n in names}
    extra = {}
    for n in names:
        scores = tune_scores(n, grids[n], rl_lr)
        beyond = edge_value(grids[n], max(scores, key=scores.get))
        if beyond:
            extra[n] = beyond
    run_all([tune_job(n, v, s, rl_lr) for n, v in extra.items() for s in TUNE_SEEDS], ARGS.jobs)
    out = {}
    for n in names:
        values = sorted(grids[n] + ([extra[n]] if n in extra else []), key=float)
        scores = tune_scores(n, values, rl_lr)
        out[n] = (values, max(scores, key=scores.get))
    return out


def tune_stage() -> None:
    build_bases(["shipped"])
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
        "Tuning grid (validation split, shipped base, seeds " + ", ".join(map(str, TUNE_SEEDS))
        + ", 150 steps; cells: mean ± sample std over the seeds at step 150; bold: the winner by "
        f"the mean avg). ReLIFT ran with GRPO's chosen RL lr {rl_lr}.", "", *lines, "",
        f"ReLIFT's SFT steps at its chosen lr: {relift_sft} -> relift_uniform interval "
        f"round({STEPS} / {statistics.fmean(relift_sft):.1f}) = {interval}.", ""])
    (Path(ARGS.out) / "toy2_tuning_grid.md").write_text(text)
    print(text)


# -- the study -------------------------------------------------------------------------------------
GRID_FILE = ROOT / "docs" / "results" / "toy2_tuning_grid.md"
CHOSEN = {"grpo": RL_LR, "luffy": LUFFY_RL_LR, "sft": SFT_LR, "relift": RELIFT_SFT_LR}
"""Which setting above holds each grid's winner."""


def grid_winners(text: str) -> dict[str, str]:
    """The settings a tuning grid (``toy2_tuning_grid.md``) chose: {method: "knob=value"} for each
    grid's bold value, and "uniform" for the relift_uniform interval it derives."""
    chosen = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) > 2 and cells[2].startswith("**"):
            chosen[cells[0]] = f"{cells[1]}={cells[2].strip('*')}"
    found = re.search(r"relift_uniform interval .* = (\d+)\.", text)
    if found:
        chosen["uniform"] = f"algorithm.sft_interval={found.group(1)}"
    return chosen


def check_settings(grid_file: Path = GRID_FILE) -> None:
    """Stops unless the settings above are the committed tuning grid's choices."""
    if not grid_file.exists():
        sys.exit(f"{grid_file} is missing: run --stage tune first (the study uses its choices)")
    chosen = grid_winners(grid_file.read_text())
    used = CHOSEN | {"uniform": UNIFORM_INTERVAL}
    wrong = [f"{m}: {used[m]} here, {chosen.get(m)} there" for m in used if chosen.get(m) != used[m]]
    if wrong:
        sys.exit(f"scripts/reproduce_toy.py's settings differ from {grid_file}: " + "; ".join(wrong))


def study_stage() -> None:
    check_settings()
    build_bases(["shipped", *ROBUSTNESS_BASES])
    scores = {b: score_base_task("study", b, "test", BASE_K_STUDY, LEVELS) for b in ["shipped", *ROBUSTNESS_BASES]}
    main = {m: {s: job("study", "shipped", m, s, METHODS[m], "test") for s in STUDY_SEEDS[m]}
            for m in METHODS if m in ARGS.methods}
    robust = {b: {m: {s: job("study", b, m, s, METHODS[m], "test") for s in ROBUSTNESS_SEEDS}
                  for m in ROBUSTNESS_METHODS} for b in ROBUSTNESS_BASES}
    # Seed-major order: a stopped study has every method at the seeds it finished.
    jobs = list(scores.values()) + [by_seed[s] for s in range(5) for by_seed in main.values() if s in by_seed]
    jobs += [j for by_method in robust.values() for by_seed in by_method.values() for j in by_seed.values()]
    run_all(jobs, ARGS.jobs)
    runs = {m: {s: load_run(j.out) | {"config": run_config(j.out)} for s, j in by_seed.items()}
            for m, by_seed in main.items()}
    by_base = {"shipped": {m: runs[m] for m in ROBUSTNESS_METHODS if m in runs}}
    by_base |= {b: {m: {s: load_run(j.out) for s, j in by_seed.items()} for m, by_seed in by_method.items()}
                for b, by_method in robust.items()}
    write_study(runs, load_eval(scores["shipped"]), by_base)


def write_study(runs: dict[str, dict[int, dict]], base: dict, by_base: dict[str, dict]) -> None:
    out = Path(ARGS.out)
    levels = level_of(base)
    shown = {m: mean_shares(runs[m]) for m in MAIN if m in runs}
    n_seeds = {m: len(runs[m]) for m in shown}
    samples = (f"base: {BASE_K_STUDY} samples; methods: 4 samples x "
               f"{'/'.join(sorted({str(n) for n in n_seeds.values()}))} seeds, mean")
    category, counts, per_level = plots.plot_capability(per_question(base), shown, levels,
                                                        out / "toy2_capability_map.png", samples)
    plots.plot_curves(runs, out / "toy2_curves.png", "test", main=MAIN)
    text = [
        "# The paper in miniature, third edition: every method on the toy world (test split)", "",
        "`python scripts/reproduce_toy.py` (protocol: docs/results/toy2_protocol.md; settings: "
        "docs/results/toy2_tuning_grid.md; premise: docs/results/toy2_premise.md; how the committed "
        "results were run: docs/results/toy2_study_log.md).", "",
        f"Accuracy = avg@4 (% of 4 samples at T=1 correct) on the test questions of each level after "
        f"{STEPS} training steps, on the shipped base; avg = mean of the four levels. Cells are mean ± "
        "sample std over the method's seeds (n in the seeds column). The base row is the base scored "
        f"once with {BASE_K_STUDY} samples per question (avg@{BASE_K_STUDY}). ReLIFT − method: mean "
        "over the seeds both ran (same seed = same prompts in the same order) of the difference of "
        "their avg, with a 95% t interval over those paired differences (mean ± t(0.975, n−1) · sd "
        "/ √n). Demos used = distinct demonstrations that entered an applied update / all training "
        "demonstrations; row-updates = demonstration rows summed over updates (a row counts each "
        "time it is used), mean over seeds. Response tokens = mean response length at the final "
        "evaluation (mean of the levels' means). fwd+bwd tokens = tokens through the updates' "
        "forward and backward passes (RL: prompt + response of every rollout; SFT: prompt + "
        "demonstration), mean over seeds.", "",
        tables.table(runs, BATCH, base), "",
        "ReLIFT minus each method, per level (points, 95% t interval over paired seeds):", "",
        tables.paired_table(runs), "",
        "Response tokens per level at the final evaluation (mean ± sample std over seeds):", "",
        tables.tokens_table(runs, base), "",
        "## The same methods on other bases", "",
        f"ReLIFT, GRPO and LUFFY with seeds {', '.join(map(str, ROBUSTNESS_SEEDS))} on the bases "
        f"{' and '.join(ROBUSTNESS_BASES)} (docs/results/toy2_premise.md), the same settings; the "
        f"shipped row uses the main study's seeds 0-4. Final test avg (%), mean ± sample std over "
        "seeds, and ReLIFT minus each method (paired seeds, 95% t interval):", "",
        tables.robustness_table(by_base), "",
        f"What LUFFY's demonstrations weigh under policy shaping (seed {ROBUSTNESS_SEEDS[0]}, each "
        "base; logged over the demonstrations mixed into each step's groups, every level's, so the "
        "last three columns mostly speak of levels 1-3):", "",
        tables.luffy_table({b: runs["luffy"][ROBUSTNESS_SEEDS[0]] for b, runs in by_base.items()
                            if ROBUSTNESS_SEEDS[0] in runs.get("luffy", {})}), "",
        f"Capability map (shipped base): a question is solved by a policy when its share of correct "
        f"samples is >= {SOLVED:g} ({samples}). Categories are over the base and all methods drawn "
        f"({', '.join(shown)}), first match: solved by the base; learned by GRPO; learned only by "
        "methods with demonstrations (some other method drawn solves it); learned by no method shown.", "",
        tables.capability_tables(category, counts, levels, per_level), "",
        "![accuracy vs training step](toy2_curves.png)", "", "![capability map](toy2_capability_map.png)", "",
    ]
    (out / "toy2_table.md").write_text("\n".join(text))
    print("\n".join(text))


ARGS: argparse.Namespace


def main(argv=None) -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="all", choices=["all", "premise", "study", "tune"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    ap.add_argument("--runs-dir", default=str(ROOT / ".cache" / "reproduce_toy3"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    ARGS = ap.parse_args(argv)
    Path(ARGS.out).mkdir(parents=True, exist_ok=True)
    started = time.time()
    if ARGS.stage in ("all", "premise"):
        premise_stage()
    if ARGS.stage == "tune":
        tune_stage()
    if ARGS.stage in ("all", "study"):
        study_stage()
    print(f"total wall time {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
