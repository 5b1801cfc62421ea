#!/usr/bin/env python3
"""What each optimization buys: relift-pl's GRPO step with each one switched off, alternating.

    python benchmarks/ablation.py                 # 3 rounds, 1 torch thread, rollout=hf
    python benchmarks/ablation.py --threads 2 --repeats 5

Configurations (all on the TRL baseline workload, B=8 x G=8, 64 tokens, see run_relift.py):
- ``all on``: the defaults;
- ``no sdpa_gqa``: ``model.attn_implementation=sdpa`` (transformers' SDPA, KV heads copied);
- ``no shared log-prob pass``: ``algorithm.share_prompt_prefix=false``;
- ``no shared prefill``: ``rollout.engine.share_prompt_prefill=false``;
- ``generate``: ``rollout.engine.decode=generate`` (Hugging Face ``generate`` instead of the
  sampling loop over a KV cache written in place);
- ``all off``: the four together (the pre-optimization step, up to the fused log-prob/entropy
  pass and batched decode, which have no switch and cost little at this vocabulary size).
Prints median s/step and the rollout / forward / backward split per configuration, and writes
``.trlbench/ablation/<timestamp>/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_compare import ROOT, add_bench_args, ensure_workload, run_one, uptime  # noqa: E402

OFF = {
    "no sdpa_gqa": ["--attn_implementation", "sdpa"],
    "no shared log-prob pass": ["--overrides", "algorithm.share_prompt_prefix=false"],
    "no shared prefill": ["--overrides", "rollout.engine.share_prompt_prefill=false"],
    "generate": ["--overrides", "rollout.engine.decode=generate"],
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    add_bench_args(ap)
    args = ap.parse_args(argv)
    bench = Path(args.bench_dir).resolve()
    workload = bench / "workload"
    ensure_workload(Path(sys.executable), Path(args.baseline_dir).resolve(), workload, [])
    out = bench / "ablation" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, str(ROOT / "benchmarks" / "run_relift.py"), "--workload", str(workload),
            "--threads", str(args.threads)]
    all_off = ["--attn_implementation", "sdpa", "--overrides", "algorithm.share_prompt_prefix=false",
               "rollout.engine.share_prompt_prefill=false", "rollout.engine.decode=generate"]
    configs = {"all on": [], **OFF, "all off": all_off}
    results: dict[str, list] = {name: [] for name in configs}
    print(f"{len(configs)} configurations x {args.repeats} rounds, {args.threads} thread(s) -> {out}")
    print(uptime(), flush=True)
    with open(out / "log.jsonl", "w") as log:
        for round_ in range(1, args.repeats + 1):
            for name, flags in configs.items():
                slug = name.replace(" ", "_").replace("-", "")
                results[name].append(run_one(f"{slug}_r{round_}", [*base, *flags], out, log, args.timeout))
    rows = ["| configuration | runs | s/step | vs all on | rollout s | log-prob fwd s | backward s | optimizer s |",
            "|---|---|---|---|---|---|---|---|"]
    ref = None
    summary = {}
    for name, runs in results.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        med = {k: statistics.median(r[k] for r in runs) for k in (
            "sec_per_step_median", "rollout_s_per_step", "logprob_forward_s_per_step",
            "backward_s_per_step", "optimizer_s_per_step")}
        summary[name] = med
        ref = ref or med["sec_per_step_median"]
        rows.append(f"| {name} | {len(runs)} | {med['sec_per_step_median']:.3f} | "
                    f"{med['sec_per_step_median'] / ref:.2f}x | {med['rollout_s_per_step']:.3f} | "
                    f"{med['logprob_forward_s_per_step']:.3f} | {med['backward_s_per_step']:.3f} | "
                    f"{med['optimizer_s_per_step']:.4f} |")
    text = "\n".join(rows)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({"summary": summary, "end_uptime": uptime()}, indent=1))
    print(text)
    print(uptime())


if __name__ == "__main__":
    main()
