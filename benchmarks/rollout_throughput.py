"""Rollout throughput: the same prompts and sampling settings through the HF and vLLM engines.

    python benchmarks/rollout_throughput.py                      # toy_vllm base, 32 prompts x 8
    python benchmarks/rollout_throughput.py --base-steps 20      # quick base (builds in seconds)
    python benchmarks/rollout_throughput.py --width 512 --layers 8   # a random-init 25M model

Both engines run in this process on the toy_vllm base (``conf/experiment/toy_vllm.yaml``), one
torch thread each (vLLM pins the process to one thread anyway). Repeats alternate between the
engines so that load from other processes hits both alike. Two settings are timed:
- natural: responses end at EOS or ``--max-new-tokens``, as in training;
- fixed: ``min_new_tokens = max_new_tokens``, so both engines generate exactly the same number of
  tokens (the HF engine pads finished rows, which the natural setting charges to it).
Tokens counted are response tokens (EOS included). Prints tokens/s per engine (median, min-max
over repeats), the ratio of medians, and the load average (the machines are shared: compare
ratios, not absolute figures). ``--width/--layers`` swap the toy base for a random-init Qwen2 of
that size (same tokenizer and prompts; it rarely emits EOS, so read its "fixed" line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import relift_pl.train  # noqa: E402, F401  (registers the config resolvers)
from relift_pl.models import load_policy, load_tokenizer  # noqa: E402
from relift_pl.rollout.base import SamplingParams  # noqa: E402
from relift_pl.rollout.hf import HFRolloutEngine  # noqa: E402
from relift_pl.rollout.vllm import VLLMRolloutEngine  # noqa: E402
from relift_pl.toy.base import tiny_qwen2_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (group size)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per engine and setting")
    parser.add_argument("--base-steps", type=int, default=600, help="toy base warm-start steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--kv-cache-mib", type=int, default=64)
    parser.add_argument("--width", type=int, default=0, help="random-init model: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="random-init model: layers")
    return parser.parse_args()


def load_world(base_steps: int):
    """The toy_vllm base directory, its tokenizer and the training prompts (all levels)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "experiment=toy_vllm",
                f"model.build.steps={base_steps}",
                "paths.output_dir=/tmp/relift-benchmark",
            ],
        )
    path = str(instantiate(cfg.model.build)())
    tokenizer = load_tokenizer(path)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")
    return path, tokenizer, [row["prompt_ids"] for row in datamodule.train_rows]


def random_model(tokenizer, width: int, layers: int, directory: str) -> str:
    """A random-init Qwen2 with head size 64 (vLLM's CPU kernels take it) and the toy tokenizer."""
    from transformers import AutoModelForCausalLM

    config = tiny_qwen2_config(
        len(tokenizer),
        hidden_size=width,
        intermediate_size=3 * width,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        num_key_value_heads=max(width // 256, 1),
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def timed(engine, prompts, sampling) -> tuple[int, float]:
    started = time.perf_counter()
    batch = engine.generate(prompts, sampling)
    return int(batch.response_mask.sum()), time.perf_counter() - started


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    path, tokenizer, rows = load_world(args.base_steps)
    if args.width:
        path = random_model(tokenizer, args.width, args.layers, tempfile.mkdtemp())
    prompts = rows[:: max(len(rows) // args.prompts, 1)][: args.prompts]  # spread over levels
    policy = load_policy(path).eval()

    hf = HFRolloutEngine()
    hf.bind(policy, tokenizer)
    vllm = VLLMRolloutEngine(dtype="float32", kv_cache_memory_bytes=args.kv_cache_mib << 20)
    vllm.bind(policy, tokenizer)  # same weights: the engine loads the same directory
    engines = {"hf": hf, "vllm": vllm}

    params = sum(p.numel() for p in policy.parameters()) / 1e6
    print(
        f"model {path} ({params:.1f}M params) | {len(prompts)} prompts x n={args.n}, max_new_tokens="
        f"{args.max_new_tokens}, temperature={args.temperature}, repeats={args.repeats}, "
        f"torch threads={torch.get_num_threads()}"
    )
    for setting, min_new in (("natural", 0), ("fixed", args.max_new_tokens)):
        sampling = SamplingParams(
            n=args.n,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=min_new,
        )
        for engine in engines.values():  # warm-up (allocations, first-call costs)
            engine.generate(prompts[:2], sampling)
        rates: dict[str, list[float]] = {name: [] for name in engines}
        tokens: dict[str, int] = dict.fromkeys(engines, 0)
        for _ in range(args.repeats):
            for name, engine in engines.items():
                count, seconds = timed(engine, prompts, sampling)
                rates[name].append(count / seconds)
                tokens[name] += count
        medians = {name: statistics.median(values) for name, values in rates.items()}
        for name in engines:
            print(
                f"{setting:8s} {name:5s} {medians[name]:7.0f} tokens/s (median; "
                f"{min(rates[name]):.0f}-{max(rates[name]):.0f}; "
                f"{tokens[name] / args.repeats:.0f} response tokens per call)"
            )
        print(f"{setting:8s} ratio vllm/hf = {medians['vllm'] / medians['hf']:.2f}x")
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    vllm.close()


if __name__ == "__main__":
    main()
