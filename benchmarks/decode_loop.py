#!/usr/bin/env python3
"""Generation alone: the HF engine's sampling loop vs Hugging Face ``generate``, same process.

    python benchmarks/decode_loop.py                  # TRL workload: 8 prompts x 8, 64 tokens
    python benchmarks/decode_loop.py --repeats 10 --threads 1

One model (the TRL baseline workload's, with relift-pl's default attention) and one engine
configuration but ``decode``; calls alternate (loop, generate, loop, ...) with the same seed per
pair, and every pair must sample the same tokens (the script stops if not). Prints the median
seconds per call of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_compare import ROOT, add_bench_args, ensure_workload  # noqa: E402

sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="exactly this many new tokens")
    add_bench_args(ap)
    args = ap.parse_args(argv)

    import torch
    from transformers import PreTrainedTokenizerFast

    from relift_pl.models import load_policy
    from relift_pl.rollout.base import SamplingParams
    from relift_pl.rollout.hf import HFRolloutEngine

    torch.set_num_threads(args.threads)
    workload = Path(args.bench_dir).resolve() / "workload"
    ensure_workload(Path(sys.executable), Path(args.baseline_dir).resolve(), workload, [])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(workload)  # the workload's rule
    policy = load_policy(str(workload))
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    with open(workload / "prompts.jsonl") as lines:
        rows = [json.loads(line) for line in lines][: args.B]
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    sampling = SamplingParams(n=args.G, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    engines = {name: HFRolloutEngine(decode=name) for name in ("loop", "generate")}
    for engine in engines.values():
        engine.bind(policy, tokenizer)
        engine.generate(prompts[:2], sampling)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for repeat in range(args.repeats):
        samples = {}
        for name, engine in engines.items():
            torch.manual_seed(repeat)
            started = time.perf_counter()
            samples[name] = engine.generate(prompts, sampling).response_ids
            seconds[name].append(time.perf_counter() - started)
        if not torch.equal(samples["loop"], samples["generate"]):
            sys.exit(f"repeat {repeat}: the loop sampled other tokens than generate")
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"{args.B} prompts x {args.G} samples x {args.tokens} tokens, {args.threads} threads, "
          f"{args.repeats} alternating repeats, identical samples in every pair")
    for name, values in seconds.items():
        print(f"  {name:9s} {medians[name]:.3f} s per call (median; {min(values):.3f}-{max(values):.3f})")
    print(f"  generate / loop = {medians['generate'] / medians['loop']:.2f}x")
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
