"""The numbers a study reads off its runs: accuracy, tokens, demonstrations, paired intervals,
capability categories. Pure functions over the dicts :func:`relift_pl.study.runs.load_run` returns:

    run = {"summary": {...}, "evals": {step: {set: {"correct": {id: share}, "tokens": {id: mean}}}},
           "metrics": {step: {key: value}}, "config": {...}}
"""

from __future__ import annotations

import math
import statistics

LEVELS = ["level1", "level2", "level3", "level4"]
EASY = LEVELS[:3]
SOLVED = 0.5
"""A question counts as solved by a policy when the mean share of correct samples is >= this."""
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093,
        29: 2.045}
"""Two-sided 95% quantiles of Student's t by degrees of freedom (t_{0.975, df})."""


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


def row_updates(run: dict, batch: int) -> int:
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


def per_seed(runs: dict[int, dict], fn) -> dict[int, float]:
    return {seed: fn(run) for seed, run in runs.items()}


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
