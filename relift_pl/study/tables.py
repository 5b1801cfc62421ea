"""The study's markdown tables, from runs read by :func:`relift_pl.study.runs.load_run`.

``Runs`` = ``{method: {seed: run}}``; every cell is a formula of :mod:`relift_pl.study.stats`.
"""

from __future__ import annotations

import math
import statistics

from relift_pl.study.stats import (
    CATEGORIES,
    EASY,
    LEVELS,
    accuracy,
    demos_used_pct,
    final_eval,
    fmt_interval,
    mean_std,
    paired_interval,
    per_seed,
    response_tokens,
    row_updates,
    series,
    trained_tokens,
)

Runs = dict[str, dict[int, dict]]


def table(runs: Runs, batch: int, base: dict | None = None, reference: str = "relift") -> str:
    """The study table: one row per method, mean ± std over its seeds of the final evaluation
    (``batch``: B prompts per step, for the row-updates)."""
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
        cells.append(f"{statistics.fmean(row_updates(r, batch) for r in seeds.values()):.0f}")
        cells.append(mean_std([response_tokens(final_eval(r))["avg"] for r in seeds.values()]))
        rl = sorted({r["summary"]["rl_steps"] for r in seeds.values()})
        sft = sorted({r["summary"]["sft_steps"] for r in seeds.values()})
        cells.append("/".join(map(str, rl)) + " / " + (f"{min(sft)}-{max(sft)}" if len(sft) > 1 else str(sft[0])))
        cells.append(f"{statistics.fmean(trained_tokens(r) for r in seeds.values()) / 1e6:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(runs: Runs, reference: str = "relift") -> str:
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


def tokens_table(runs: Runs, base: dict | None = None) -> str:
    head = ["method", *LEVELS, "avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base is not None:
        tok = response_tokens(base)
        lines.append("| base | " + " | ".join(f"{tok[k]:.1f}" for k in [*LEVELS, "avg"]) + " |")
    for method, seeds in runs.items():
        toks = [response_tokens(final_eval(r)) for r in seeds.values()]
        lines.append(f"| {method} | " + " | ".join(mean_std([t[k] for t in toks]) for k in [*LEVELS, "avg"]) + " |")
    return "\n".join(lines)



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


def _level4_samples(base_eval: dict, k: int) -> tuple[int, int]:
    """(correct, total) level-4 samples of a base scored with k samples per question."""
    shares = base_eval["level4"]["correct"]
    return round(sum(shares.values()) * k), len(shares) * k


def _highest(run: dict, key: str = "level4") -> float:
    """The highest accuracy (%) of ``key`` at any evaluation after step 0."""
    return max(accuracy(e)[key] * 100 for t, e in run["evals"].items() if t > 0)


def premise_table(runs: Runs, base_eval: dict | None, base_k: int, batch: int) -> str:
    """P1-P4 on one base (bars in docs/results/toy2_protocol.md), each from its runs' numbers:
    ``runs`` = {"grpo", "sft_level4", "sft_all"} x seeds; ``base_eval``: the base scored with
    ``base_k`` samples per level-4 question."""
    base0 = next(iter(runs["grpo"].values()))["evals"][0]  # step 0: the base, avg@4
    b = accuracy(base0)
    lines = []
    grpo = runs["grpo"]
    g_final = [accuracy(final_eval(r))["level4"] * 100 for r in grpo.values()]
    g_max = max(_highest(r) for r in grpo.values())
    steps = max(next(iter(grpo.values()))["evals"])
    if base_eval is not None:
        correct, total = _level4_samples(base_eval, base_k)
        base_line = (f"{correct} correct of {total} samples ({total // base_k} level-4 validation "
                     f"questions x {base_k}, T=1)")
    else:
        correct, total, base_line = 0, 0, "(base evaluation missing)"
    p1 = total > 0 and correct / total <= 0.001 and g_max <= 1.0
    lines.append(("P1", "beyond reach", "at most 0.1% of the base's level-4 samples correct, and GRPO's "
                  f"level-4 accuracy <= 1% at every evaluation of every seed ({steps} steps)",
                  f"base: {base_line}; GRPO ({len(g_final)} seeds): level 4 {mean_std(g_final)}% at step "
                  f"{steps}, highest at any evaluation {g_max:.1f}%", p1))
    sl = runs["sft_level4"]
    fin = [accuracy(final_eval(r)) for r in sl.values()]
    sft_steps = max(next(iter(sl.values()))["evals"])
    l4 = [f["level4"] * 100 for f in fin]
    lines.append(("P2", "learnable from demonstrations", "level-4 accuracy >= 50% after SFT on the "
                  f"level-4 demonstrations alone, {sft_steps} SFT steps of {batch} rows (mean over seeds)",
                  f"level 4: base {b['level4'] * 100:.1f}% -> {mean_std(l4)}% ({len(l4)} seeds)",
                  statistics.fmean(l4) >= 50.0))
    drops = {s: [(f[s] - b[s]) * 100 for f in fin] for s in EASY}
    lines.append(("P3", "orthogonal", f"each of levels 1-3 at step {sft_steps} at most 5 points below the "
                  "base (mean over seeds)",
                  "; ".join(f"{s}: {b[s] * 100:.1f} -> {mean_std([f[s] * 100 for f in fin])} "
                            f"({statistics.fmean(drops[s]):+.1f})" for s in EASY),
                  all(statistics.fmean(d) >= -5.0 for d in drops.values())))
    sa = runs["sft_all"]
    tok_all = [response_tokens(final_eval(r), EASY)["avg"] for r in sa.values()]
    tok_l4 = [response_tokens(final_eval(r), EASY)["avg"] for r in sl.values()]
    tok_g = [response_tokens(final_eval(r), EASY)["avg"] for r in grpo.values()]
    base_easy = response_tokens(base0, EASY)["avg"]
    ratio = statistics.fmean(tok_all) / base_easy
    acc_all = [accuracy(final_eval(r)) for r in sa.values()]
    lines.append(("P4", "imitation everywhere costs", "mean response tokens on levels 1-3 >= 1.5x the "
                  f"base's after SFT on every level's demonstrations (same lr, {steps} steps); the "
                  "accuracy it leaves is reported, not barred",
                  f"levels 1-3 response tokens: base {base_easy:.1f}; SFT on all {mean_std(tok_all)} "
                  f"({ratio:.2f}x); SFT on level 4 only {mean_std(tok_l4)}; GRPO {mean_std(tok_g)}. "
                  "Accuracy after SFT on all: " + ", ".join(
                      f"{s} {mean_std([a[s] * 100 for a in acc_all])}" for s in LEVELS), ratio >= 1.5))
    out = ["| premise | what | bar (set before the runs) | measured (validation) | holds |",
           "|---|---|---|---|---|"]
    out += [f"| {p} | {what} | {bar} | {measured} | {'yes' if ok else 'NO'} |"
            for p, what, bar, measured, ok in lines]
    seeds = sorted({s for r in runs.values() for s in r})
    detail = ["", f"Per level, mean ± sample std over the seeds ({', '.join(map(str, seeds))}), "
              "validation questions, avg@4 at T=1:", "",
              "| run | step | " + " | ".join(LEVELS) + " | avg | response tokens (levels 1-3) |",
              "|---|---|" + "---|" * (len(LEVELS) + 2),
              "| base | 0 | " + " | ".join(f"{b[s] * 100:.1f}" for s in LEVELS)
              + f" | {b['avg'] * 100:.1f} | {base_easy:.1f} |"]
    for name, by_seed in runs.items():
        fins = [accuracy(final_eval(r)) for r in by_seed.values()]
        toks = [response_tokens(final_eval(r), EASY)["avg"] for r in by_seed.values()]
        step = max(next(iter(by_seed.values()))["evals"])
        detail.append(f"| {name} | {step} | " + " | ".join(mean_std([f[s] * 100 for f in fins]) for s in [*LEVELS, "avg"])
                      + f" | {mean_std(toks)} |")
    return "\n".join(out + detail)


def bases_table(bases: dict[str, dict]) -> str:
    """The premise on every base, one row each: ``bases[name]`` = {"base_eval", "base_k",
    "key_tokens" (``relift_pl.study.key_tokens.summary``), "runs": {"grpo", "luffy",
    "sft_level4"} -> {seed: run}}; LUFFY and SFT are read at their lowest seed. P1: <= 0.1% of
    base samples and GRPO's level 4 <= 1% at every evaluation of every seed; P2: SFT on level 4
    >= 50% at its last step; P3: levels 1-3 there at most 5 points below the base (the bars of
    docs/results/toy2_protocol.md)."""
    head = ["base", "level-4 samples correct", "least likely demo token p (median / max)",
            "2nd least likely (median / max)", "GRPO level 4, highest (per seed)", "LUFFY level 4, last (highest)",
            "SFT on level 4: level 4", "SFT on level 4: levels 1-3 vs base", "P1", "P2", "P3"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, b in bases.items():
        correct, total = _level4_samples(b["base_eval"], b["base_k"])
        keys = b["key_tokens"]
        runs = b["runs"]
        g_max = [_highest(run) for _, run in sorted(runs["grpo"].items())]
        luffy = runs["luffy"][min(runs["luffy"])]
        sft = runs["sft_level4"][min(runs["sft_level4"])]
        base0, sft_final = accuracy(sft["evals"][0]), accuracy(final_eval(sft))
        drops = [(sft_final[s] - base0[s]) * 100 for s in EASY]
        p1 = correct / total <= 0.001 and max(g_max) <= 1.0
        cells = [name, f"{correct} / {total}",
                 f"{keys['lowest_median']:.1e} / {keys['lowest_max']:.1e}",
                 f"{keys['second_median']:.1e} / {keys['second_max']:.1e}",
                 " / ".join(f"{g:.1f}" for g in g_max) + "%",
                 f"{accuracy(final_eval(luffy))['level4'] * 100:.1f}% ({_highest(luffy):.1f}%)",
                 f"{sft_final['level4'] * 100:.1f}%", " / ".join(f"{d:+.1f}" for d in drops),
                 "yes" if p1 else "NO", "yes" if sft_final["level4"] >= 0.5 else "NO",
                 "yes" if min(drops) >= -5.0 else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def key_token_table(base_keys: dict[str, dict], curves: dict[str, dict[str, dict[int, dict]]]) -> str:
    """The level-4 demonstrations' least and second least likely token (median probabilities,
    ``relift_pl.study.key_tokens.summary``) under each run's policy, by step: ``base_keys``
    = {base: the base's summary (step 0)}; ``curves`` = {base: {run: {step: summary}}}."""
    steps = sorted({t for runs in curves.values() for curve in runs.values() for t in curve})
    lines = ["| base | run | step 0 (base) | " + " | ".join(map(str, steps)) + " |",
             "|---|---|" + "---|" * (len(steps) + 1)]

    def cell(keys: dict | None) -> str:
        return f"{keys['lowest_median']:.1e} / {keys['second_median']:.1e}" if keys else ""

    for base, runs in curves.items():
        for name, curve in runs.items():
            lines.append(f"| {base} | {name} | {cell(base_keys[base])} | "
                         + " | ".join(cell(curve.get(t)) for t in steps) + " |")
    return "\n".join(lines)


def robustness_table(by_base: dict[str, Runs], reference: str = "relift") -> str:
    """Per base and method: the final avg (mean ± sample std over seeds) and ReLIFT minus the
    method (paired seeds, 95% t interval); then per method the spread of its mean avg between
    bases (sample std over the bases' means) beside its spread between seeds (the mean over
    bases of the within-base sample std)."""
    methods = list(next(iter(by_base.values())))
    head = ["base", *[f"{m} avg" for m in methods], *[f"{reference} − {m}" for m in methods if m != reference]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means: dict[str, list[float]] = {m: [] for m in methods}
    stds: dict[str, list[float]] = {m: [] for m in methods}
    for name, runs in by_base.items():
        avg = {m: {s: accuracy(final_eval(r))["avg"] * 100 for s, r in runs[m].items()} for m in methods}
        cells = [name] + [mean_std(list(avg[m].values())) for m in methods]
        cells += [fmt_interval(*paired_interval(avg[reference], avg[m])[:3]) for m in methods if m != reference]
        lines.append("| " + " | ".join(cells) + " |")
        for m in methods:
            values = list(avg[m].values())
            means[m].append(statistics.fmean(values))
            stds[m].append(statistics.stdev(values) if len(values) > 1 else 0.0)
    lines += ["", "| method | spread between bases (std of the bases' means) | spread between seeds "
              "(mean within-base std) |", "|---|---|---|"]
    for m in methods:
        between = statistics.stdev(means[m]) if len(means[m]) > 1 else 0.0
        lines.append(f"| {m} | {between:.1f} | {statistics.fmean(stds[m]):.1f} |")
    return "\n".join(lines)


def luffy_table(runs: dict[str, dict]) -> str:
    """LUFFY's level-4 learning on each base beside what its mixed-in demonstrations weigh:
    at each evaluation, level-4 accuracy at that evaluation, the policy's
    log10-probability of each demonstration's least likely token (mean over the demonstrations
    mixed into that step's groups: every level's, not level 4's alone) and the gradient weight policy shaping gives that token's log-probability
    (``gamma p / (p + gamma)^2``; SFT gives every token 1)."""
    lines = ["| base | step | level 4 (%) | least likely demo token: mean of log10 p | mean of its shaping "
             "weight | demo tokens: mean p |", "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        logp = dict(series(run, "luffy/min_token_logprob"))
        weight = dict(series(run, "luffy/min_token_weight"))
        prob = dict(series(run, "luffy/off_policy_prob"))
        for step in sorted(run["evals"]):
            metric_step = max(step, 1)  # step 0's evaluation precedes the first logged step
            if metric_step not in logp:
                continue
            lines.append(f"| {name} | {step} | {accuracy(run['evals'][step])['level4'] * 100:.1f} | "
                         f"{logp[metric_step] / math.log(10):.2f} | {weight[metric_step]:.1e} | "
                         f"{prob.get(metric_step, math.nan):.3f} |")
    return "\n".join(lines)
