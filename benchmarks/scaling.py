#!/usr/bin/env python3
"""How relift-pl's GRPO step time grows with G, response length and model size (CPU).

    python benchmarks/scaling.py                  # relift-pl grpo rollout=hf, 2 rounds
    python benchmarks/scaling.py --with-trl       # TRL's run_trl.py on the same grid too

Grid (one axis at a time around the TRL workload point G=8, 64 tokens, 1M params):
G in {4, 8, 16}; response length in {32, 64, 128} (exactly that many tokens); model 1M
(the workload) and ~10M (make_workload.py --hidden 256 --layers 10, same tokenizer and prompts).
B=8 prompts throughout. Each run: 6 steps, the first 2 excluded. Rounds alternate over the grid.
Prints the median s/step per point, the split (generate / update), and least-squares slopes:
s/step per extra sample per prompt (G) and per extra response token. Outputs go to
``.trlbench/scaling/<timestamp>/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_compare import ROOT, add_bench_args, ensure_trl, ensure_workload, run_one, uptime  # noqa: E402

MODEL_10M = ["--hidden", "256", "--layers", "10", "--heads", "4", "--kv_heads", "2"]


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys on xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return b, my - b * mx


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--with-trl", action="store_true")
    ap.add_argument("--rollout", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    add_bench_args(ap)
    args = ap.parse_args(argv)
    bench = Path(args.bench_dir).resolve()
    baseline = Path(args.baseline_dir).resolve()
    python = ensure_trl(bench, baseline) if args.with_trl else Path(sys.executable)
    workloads = {"1M": bench / "workload", "10M": bench / "workload-10m"}
    ensure_workload(python, baseline, workloads["1M"], [])
    ensure_workload(python, baseline, workloads["10M"], MODEL_10M)
    out = bench / "scaling" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    points = [("1M", g, 64) for g in (4, 8, 16)] + [("1M", 8, r) for r in (32, 128)] + [("10M", 8, 64)]
    impls = {"relift": [sys.executable, str(ROOT / "benchmarks" / "run_relift.py"), "--rollout", args.rollout]}
    if args.with_trl:
        impls["trl"] = [str(python), str(baseline / "run_trl.py")]
    results: dict[tuple, list[dict]] = {}
    print(f"scaling grid: {len(points)} points x {list(impls)} x {args.repeats} rounds -> {out}")
    print(uptime(), flush=True)
    with open(out / "log.jsonl", "w") as log:
        for round_ in range(1, args.repeats + 1):
            for model, g, r in points:
                for impl, cmd in impls.items():
                    full = [*cmd, "--workload", str(workloads[model]), "--G", str(g),
                            "--max_completion_length", str(r), "--steps", str(args.steps),
                            "--warmup", str(args.warmup)]
                    if impl == "trl":
                        full += ["--output_dir", str(out / "trl_out")]
                    name = f"{impl}_{model}_G{g}_R{r}_r{round_}"
                    results.setdefault((impl, model, g, r), []).append(run_one(name, full, out, log, args.timeout))

    rows, summary = [], {}
    for (impl, model, g, r), runs in results.items():
        runs = [x for x in runs if x]
        if not runs:
            continue
        med = {k: statistics.median(x[k] for x in runs) for k in
               ("sec_per_step_median", "completions_per_s", "generate_s_per_step", "peak_rss_mb")}
        med["update_s"] = med["sec_per_step_median"] - med["generate_s_per_step"]
        summary[f"{impl} {model} G={g} R={r}"] = med
        rows.append(f"| {impl} | {model} | {g} | {r} | {med['sec_per_step_median']:.3f} | "
                    f"{med['generate_s_per_step']:.3f} | {med['update_s']:.3f} | "
                    f"{med['completions_per_s']:.1f} | {med['peak_rss_mb']:.0f} |")
    table = ["| impl | model | G | response tokens | s/step | generate s | rest s | completions/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|", *rows]
    fits = []
    for impl in impls:
        def pick(model, g, r, impl=impl):
            return summary.get(f"{impl} {model} G={g} R={r}", {}).get("sec_per_step_median")
        gs = [(g, pick("1M", g, 64)) for g in (4, 8, 16)]
        rs = [(r, pick("1M", 8, r)) for r in (32, 64, 128)]
        for axis, pts in (("G", gs), ("response tokens", rs)):
            pts = [(x, y) for x, y in pts if y is not None]
            if len(pts) >= 2:
                xs, ys = [x for x, _ in pts], [y for _, y in pts]
                b, a = slope(xs, ys)
                ss_res = sum((y - a - b * x) ** 2 for x, y in pts)
                ss_tot = sum((y - statistics.fmean(ys)) ** 2 for y in ys) or 1e-12
                fits.append(f"{impl}: s/step = {a:.3f} + {b:.4f} x {axis} (R^2 = {1 - ss_res / ss_tot:.3f}, "
                            f"points {', '.join(f'{x}: {y:.3f}' for x, y in pts)})")
        small, big = pick("1M", 8, 64), pick("10M", 8, 64)
        if small and big:
            fits.append(f"{impl}: ~10M / 1M params step time = {big / small:.2f}x")
    text = "\n".join(table) + "\n\n" + "\n".join(fits)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({"summary": summary, "fits": fits, "end_uptime": uptime()}, indent=1))
    print(text)
    print(uptime())


if __name__ == "__main__":
    main()
