"""One-file GPU check: bf16 update-phase throughput / MFU, and FSDP2 (Lightning) on CUDA.

Checks on one GPU (H100 / H200), with a Qwen2.5-0.5B-shaped model built from config (no hub):

1. Peak: a large bf16 `torch.matmul` (8192^3 by default), timed; its TFLOP/s is the MFU denominator.
2. Update phase, single GPU, no Lightning: an RL step (forward over [B x (P+R)] tokens through
   `relift_pl.algorithms.policy_logprobs` at the sampling temperature, `PolicyGradientLoss` with
   random advantages, backward, grad clip, fused AdamW) and an SFT step (same forward, `SFTLoss`, a
   second AdamW over the same parameters). Warm-up, then timed steps: tokens/s, median step time,
   peak memory and MFU (model FLOPs / step time / measured matmul peak; the formula is printed).
   Sweeps: several micro-batch sizes, gradient checkpointing off/on/both, bf16 or amp precision.
3. FSDP2 through Lightning: `ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)`,
   devices=1, manual optimization; `configure_model` applies `fully_shard` per decoder layer, then
   the root, with a bf16 `MixedPrecisionPolicy` (params bf16, reduce fp32); two AdamW over the
   sharded (DTensor) params; one RL-style and one SFT-style step per batch via `manual_backward`,
   `clip_grad_norm_` (DTensor norm -> full_tensor()), and a greedy `generate`. OK/FAIL per stage.
4. A final JSON line with every figure; also written to $OUT/gpu_check.json when OUT is set (after
   each part, so a run killed later still leaves the figures measured so far).

Run on the GPU machine (default: about 1 min; the sweep below about 2 min; model init included):
    python scripts/gpu_check.py
    python scripts/gpu_check.py --micro-batch 8 16 --grad-ckpt both
Here, on CPU (tiny fp32 model, FSDP2 with gloo, < 1 min):
    python scripts/gpu_check.py --cpu-smoke

Imports only torch, transformers, lightning (lightning.pytorch or pytorch_lightning) and the
pure-torch modules relift_pl.algorithms.{logprobs,losses}; never hydra, datasets, vllm, math-verify.
Its parts sit next to it: gpu_check_model.py (model, batches, the algorithm imports),
gpu_check_bench.py (parts 1-2), gpu_check_fsdp2.py (part 3).

What was done for throughput (see the flags): pure bf16 weights/grads/optimizer states (`--precision
bf16`; `amp` keeps fp32 master weights under bf16 autocast, closer to the FSDP2 mixed policy);
fused AdamW (one kernel over all params instead of foreach lists); `clip_grad_norm_(foreach=True)`;
no host sync inside a step (grad norms stay on device); old log-probs = current log-probs detached
(one optimizer step per batch, ratio 1, as the module does: no second forward); `logits_to_keep`
so the vocabulary projection runs on the R+1 response positions only (policy_logprobs does this);
row-chunked float32 log-softmax (`--logprob-chunk`); TF32 allowed for any fp32 matmul; SDPA with an
all-ones mask so transformers takes the causal flash path (no padding in the synthetic batch);
optional regional `torch.compile` of the decoder layers (`--compile`). Known cost left in
relift_pl/algorithms/logprobs.py (not changed here): with entropy on, the log-prob and the entropy
each upcast the [N, R, V] logits to float32 and both copies plus the softmax are saved for backward
(~3 x 4 bytes x N x R x V); a fused log-prob+entropy autograd function would cut that to one.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from gpu_check_bench import FLOPS_FORMULA, run_benchmark
from gpu_check_fsdp2 import run_fsdp2
from gpu_check_model import GIB

# --cpu-smoke: a tiny fp32 run on CPU (hidden 64, 2 layers, a few tokens), FSDP2 with gloo.
SMOKE_DEFAULTS = dict(micro_batch=[2], prompt_len=8, response_len=16, precision=["fp32"], layers=2,
                      fsdp_layers=2, warmup=1, steps=2, fsdp_batches=2, matmul_size=256,
                      matmul_iters=3, watchdog_s=120.0)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 run on CPU (for testing)")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[8], help="B; several = sweep")
    p.add_argument("--prompt-len", type=int, default=256, help="P")
    p.add_argument("--response-len", type=int, default=768, help="R")
    p.add_argument("--grad-ckpt", choices=["off", "on", "both"], default="off")
    p.add_argument(
        "--precision",
        choices=["bf16", "amp", "fp32"],
        nargs="+",
        default=["bf16"],
        help="bf16: pure bf16 params/grads/Adam; amp: fp32 params + bf16 autocast",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--layers", type=int, default=24, help="decoder layers of the benchmark model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps per RL / SFT figure")
    p.add_argument("--temperature", type=float, default=1.0, help="RL sampling temperature")
    p.add_argument("--entropy-coef", type=float, default=1e-4, help="conf/algorithm/relift.yaml")
    p.add_argument(
        "--no-entropy", action="store_true", help="skip the entropy (module computes it)"
    )
    p.add_argument("--logprob-chunk", type=int, default=2, help="rows per fp32 chunk; 0 = all")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--matmul-iters", type=int, default=20)
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--skip-fsdp", action="store_true")
    p.add_argument("--fsdp-layers", type=int, default=4)
    p.add_argument("--fsdp-batches", type=int, default=3, help="batches (each: RL + SFT step)")
    p.add_argument("--watchdog-s", type=float, default=330.0, help="dump stacks and exit after")
    if p.parse_known_args(argv)[0].cpu_smoke:  # tiny defaults; explicit flags still win
        p.set_defaults(**SMOKE_DEFAULTS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Main


def write_report(report: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": importlib.import_module("transformers").__version__,
           "python": sys.version.split()[0]}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / GIB, 1))  # fmt: skip
    else:
        env["device"] = "cpu"
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    faulthandler.dump_traceback_later(args.watchdog_s, exit=True)  # a hang still ends the run
    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        # TF32 for whatever fp32 matmuls remain (amp master-weight paths); bf16 is unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        print("no CUDA device: run with --cpu-smoke to test on CPU")
        return 2
    torch.manual_seed(0)
    report: dict = {"check": "gpu_check", "cpu_smoke": args.cpu_smoke, **environment(device),
                    "flops_formula": FLOPS_FORMULA}  # fmt: skip
    print(f"[env] {json.dumps(report)}")
    t_start = time.perf_counter()
    if not args.skip_bench:
        run_benchmark(args, device, report)
        write_report(report)
    if not args.skip_fsdp:
        print("[fsdp2] Lightning ModelParallelStrategy, fully_shard per layer + root ...")
        fsdp = run_fsdp2(args, device)
        report["fsdp2"] = fsdp
        report["fsdp2_status"] = fsdp["status"]
        for name, value in fsdp["stages"].items():
            print(f"[fsdp2] {name:15s} {value}  ({fsdp['ms'].get(name, '-')} ms)")
        print(f"[fsdp2] step ms by batch: {fsdp['step_ms_by_batch']}")
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    faulthandler.cancel_dump_traceback_later()
    write_report(report)
    print(json.dumps(report))
    bench_ok = args.skip_bench or any(r["status"] == "OK" for r in report.get("bench", []))
    fsdp_ok = args.skip_fsdp or report["fsdp2_status"] == "OK"
    return 0 if bench_ok and fsdp_ok else 1


if __name__ == "__main__":
    sys.exit(main())
