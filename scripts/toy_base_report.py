"""Per-level accuracy of the first toy world's base policy (`experiment=toy`, `model=tiny`),
sampled at temperature 1.0. (The default toy world's base is measured by
`scripts/reproduce_toy.py --stage premise`.)

The first toy world is tuned so that the warm-started base solves levels 1-2 (>= 60%), sometimes solves
level 3 (~5-40%) and never solves level 4 (< 2%). This script measures exactly that on held-out
test problems: k samples per problem, a sample counts when the text after `</think>` ends in
`\\boxed{gold}` (the toy answers are plain integers, so string equality is what math-verify would
decide).

Usage: python scripts/toy_base_report.py [--cache-dir .cache/toy_base] [--n 50 --k 8]
(warm-start knobs such as --steps and --middle-fraction select, or train, another cached base).
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from relift_pl.toy.base import METADATA_FILE, ensure_toy_base
from relift_pl.toy.world import LEVELS, make_rows

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def is_correct(response: str, gold: str) -> bool:
    """The last `\\boxed{}` after `</think>` equals the gold answer."""
    if "</think>" not in response:
        return False
    boxed = BOXED.findall(response.split("</think>")[-1])
    return bool(boxed) and boxed[-1].strip() == gold


@torch.no_grad()
def level_accuracy(
    model, tokenizer, rows: list[dict], k: int, max_new_tokens: int, temperature: float
):
    """Mean accuracy over rows x k samples, and the longest prompt / response in tokens."""
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["problem"]}], add_generation_prompt=True, tokenize=False
        )
        for r in rows
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = batch.to(model.device)
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        num_return_sequences=k,
        max_new_tokens=max_new_tokens,
    )
    responses = tokenizer.batch_decode(
        out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    golds = [r["answer"] for r in rows for _ in range(k)]
    correct = sum(is_correct(resp, gold) for resp, gold in zip(responses, golds, strict=True))
    longest_demo = max(len(tokenizer(r["demonstration"])["input_ids"]) + 1 for r in rows)  # + EOS
    return correct / len(responses), batch["input_ids"].shape[1], longest_demo, responses[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=".cache/toy_base")
    parser.add_argument("--n", type=int, default=50, help="test problems per level (at most)")
    parser.add_argument("--k", type=int, default=8, help="samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, default=None, help="warm-start steps (default: base's)"
    )
    parser.add_argument("--middle-fraction", type=float, default=None)
    parser.add_argument("--middle-full-rate", type=float, default=None)
    parser.add_argument("--base-seed", type=int, default=None, help="warm-start seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    knobs = {
        "steps": args.steps,
        "middle_fraction": args.middle_fraction,
        "middle_full_rate": args.middle_full_rate,
        "seed": args.base_seed,
    }
    start = time.perf_counter()
    path = ensure_toy_base(args.cache_dir, **{k: v for k, v in knobs.items() if v is not None})
    meta = json.loads((path / METADATA_FILE).read_text())
    print(f"base: {path} (ready in {time.perf_counter() - start:.1f}s)")
    print(f"warm-start: {meta['train_seconds']:.0f}s, final loss {meta['final_loss']:.4f}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    print(f"params: {sum(p.numel() for p in model.parameters()):,}")

    torch.manual_seed(args.seed)
    print(f"| level | problems | samples | acc@T={args.temperature} | max prompt | max response |")
    print("|---|---|---|---|---|---|")
    for level in LEVELS:
        rows = make_rows("test", [level], args.n, args.seed)
        t0 = time.perf_counter()
        acc, prompt_len, response_len, example = level_accuracy(
            model, tokenizer, rows, args.k, args.max_new_tokens, args.temperature
        )
        print(
            f"| {level} | {len(rows)} | {len(rows) * args.k} | {acc:.1%} | {prompt_len} | "
            f"{response_len} |  ({time.perf_counter() - t0:.1f}s) e.g. {rows[0]['problem']}= "
            f"{example!r}",
            flush=True,
        )


if __name__ == "__main__":
    main()
