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
import contextlib
import faulthandler
import functools
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Qwen2Config, Qwen2ForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
# Dense bf16 tensor-core peaks from the datasheets (TFLOP/s, no sparsity), for a second MFU figure.
SPEC_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                    "A100": 312.0}  # fmt: skip
# --cpu-smoke: a tiny fp32 run on CPU (hidden 64, 2 layers, a few tokens), FSDP2 with gloo.
SMOKE_DEFAULTS = dict(micro_batch=[2], prompt_len=8, response_len=16, precision=["fp32"], layers=2,
                      fsdp_layers=2, warmup=1, steps=2, fsdp_batches=2, matmul_size=256,
                      matmul_iters=3, watchdog_s=120.0)  # fmt: skip
FLOPS_FORMULA = (
    "model FLOPs/step = 6*N_layers*B*(P+R) + 6*h*V*B*(R+1) + 12*L*h*B*(P+R)^2 "
    "[N_layers = decoder-layer params; lm_head counted on the R+1 kept positions (logits_to_keep); "
    "attention non-causal (PaLM convention); checkpoint recompute not counted: MFU, not HFU]"
)


def _load_algorithms():
    """relift_pl.algorithms.{logprobs,losses}: pure torch. Falls back to loading the files by path
    if the package __init__ picks up an import this machine lacks."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        logprobs = importlib.import_module("relift_pl.algorithms.logprobs")
        losses = importlib.import_module("relift_pl.algorithms.losses")
    except ImportError as err:
        print(f"[note] package import failed ({err}); loading the algorithm files by path")
        mods = []
        for name in ("logprobs", "losses"):
            path = REPO_ROOT / "relift_pl" / "algorithms" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(f"_relift_{name}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mods.append(mod)
        logprobs, losses = mods
    return logprobs.policy_logprobs, losses.PolicyGradientLoss, losses.SFTLoss


policy_logprobs, PolicyGradientLoss, SFTLoss = _load_algorithms()


# ----------------------------------------------------------------------------------------------
# Arguments, model, data


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


def model_config(args: argparse.Namespace, layers: int) -> Qwen2Config:
    """Qwen2.5-0.5B's shape (or a tiny one for --cpu-smoke), sdpa attention."""
    if args.cpu_smoke:
        shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2)  # fmt: skip
    else:
        shape = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                     num_attention_heads=14, num_key_value_heads=2)  # fmt: skip
    config = Qwen2Config(num_hidden_layers=layers, tie_word_embeddings=True,
                         max_position_embeddings=4096, use_cache=False, **shape)  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


def build_model(config: Qwen2Config, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random-init model created directly on `device` in `dtype` (no CPU init, no hub)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    # No model.to(dtype): that would also cast the fp32 rotary inv_freq buffer.
    return model.to(device).train()


@dataclass
class Batch:
    input_ids: Tensor  # [B, P + R]
    attention_mask: Tensor  # [B, P + R]; all ones: no padding, causal flash path
    response_mask: Tensor  # [B, R]
    advantages: Tensor  # [B]
    num_response: int


def make_batch(mb: int, prompt: int, response: int, vocab: int, device: torch.device) -> Batch:
    ids = torch.randint(0, vocab, (mb, prompt + response), device=device)
    return Batch(ids, torch.ones_like(ids), torch.ones(mb, response, device=device),
                 torch.randn(mb, device=device), response)  # fmt: skip


def train_flops(config: Qwen2Config, n_layer_params: int, mb: int, prompt: int, resp: int) -> float:
    """Model FLOPs of one forward+backward, see FLOPS_FORMULA."""
    seq, h = prompt + resp, config.hidden_size
    dense = 6 * n_layer_params * mb * seq
    head = 6 * h * config.vocab_size * mb * (resp + 1)
    attn = 12 * config.num_hidden_layers * h * mb * seq * seq
    return float(dense + head + attn)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_text(err: BaseException, limit: int = 400) -> str:
    return f"{type(err).__name__}: {err}"[:limit]


# ----------------------------------------------------------------------------------------------
# Peak and the single-device update-phase benchmark


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Best of 3 rounds of `iters` back-to-back n^3 matmuls on random data (not zeros)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    sync(device)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12)
    del a, b
    return best


def time_steps(step, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds per step, synchronizing after each timed step."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


class UpdateBench:
    """RL and SFT update steps over one model, with their own AdamW each (as ReLIFT)."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, device: torch.device,
                 precision: str) -> None:  # fmt: skip
        self.model, self.args, self.device = model, args, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        fused = device.type == "cuda"  # fused AdamW: one multi-tensor kernel per step
        self.opt_rl = torch.optim.AdamW(self.params, lr=1e-6, weight_decay=0.01, fused=fused)
        self.opt_sft = torch.optim.AdamW(self.params, lr=1e-6, weight_decay=0.01, fused=fused)
        self.with_entropy = not args.no_entropy
        coef = args.entropy_coef if self.with_entropy else 0.0
        self.pg_loss = PolicyGradientLoss(agg_mode="constant", entropy_coef=coef)
        self.sft_loss = SFTLoss(entropy_coef=coef)
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
            if precision == "amp"
            else contextlib.nullcontext
        )

    def _logprobs(self, batch: Batch, temperature: float) -> tuple[Tensor, Tensor | None]:
        with self.autocast():
            return policy_logprobs(
                self.model, batch.input_ids, batch.attention_mask, batch.num_response,
                temperature=temperature, with_entropy=self.with_entropy,
                chunk_size=self.args.logprob_chunk or None,
            )  # fmt: skip

    def _update(self, loss: Tensor, opt: torch.optim.Optimizer, clip: float) -> Tensor:
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def rl_step(self, batch: Batch) -> Tensor:
        logp, ent = self._logprobs(batch, self.args.temperature)
        # One optimizer step per rollout batch: old log-probs are the current ones (ratio 1).
        loss, _ = self.pg_loss(logp, logp.detach(), batch.advantages, batch.response_mask,
                               entropy=ent)  # fmt: skip
        return self._update(loss, self.opt_rl, clip=0.7)

    def sft_step(self, batch: Batch) -> Tensor:
        logp, ent = self._logprobs(batch, 1.0)  # demonstrations: temperature 1
        loss, _ = self.sft_loss(logp, batch.response_mask, entropy=ent)
        return self._update(loss, self.opt_sft, clip=1.0)


def set_grad_ckpt(model: nn.Module, on: bool) -> None:
    assert isinstance(on, bool), on
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def bench_one(model, config, n_layer_params, args, device, precision, mb, gc, peak_tflops) -> dict:
    """One (precision, micro-batch, checkpointing on/off = gc) point: RL and SFT figures."""
    row = {"precision": precision, "micro_batch": mb, "prompt_len": args.prompt_len,
           "response_len": args.response_len, "grad_ckpt": "on" if gc else "off",
           "compile": args.compile}  # fmt: skip
    bench = None
    try:
        set_grad_ckpt(model, gc)
        if model.is_gradient_checkpointing != gc:
            raise RuntimeError(f"gradient checkpointing did not switch to {row['grad_ckpt']}")
        bench = UpdateBench(model, args, device, precision)
        batch = make_batch(mb, args.prompt_len, args.response_len, config.vocab_size, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rl = time_steps(functools.partial(bench.rl_step, batch), args.warmup, args.steps, device)
        sft = time_steps(functools.partial(bench.sft_step, batch), args.warmup, args.steps, device)
        flops = train_flops(config, n_layer_params, mb, args.prompt_len, args.response_len)
        tokens = mb * (args.prompt_len + args.response_len)
        for name, times in (("rl", rl), ("sft", sft)):
            med = statistics.median(times)
            row[f"{name}_step_ms"] = round(med * 1e3, 2)
            row[f"{name}_tokens_per_s"] = round(tokens / med)
            row[f"{name}_tflops"] = round(flops / med / 1e12, 1)
            row[f"{name}_mfu_pct"] = round(100 * flops / med / 1e12 / peak_tflops, 1)
        row["flops_per_step"] = flops
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
        row["status"] = "OK"
    except torch.cuda.OutOfMemoryError as err:
        row["status"] = "OOM: " + error_text(err, 160)
    except Exception as err:  # report and go on with the next point
        traceback.print_exc()
        row["status"] = "FAIL: " + error_text(err)
    finally:
        if bench is not None:  # drop both Adam states before the next point
            bench.opt_rl.state.clear()
            bench.opt_sft.state.clear()
        bench = None
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_row(row)
    return row


def print_row(row: dict) -> None:
    if row["status"] != "OK":
        print(f"  {row['precision']:5s} B={row['micro_batch']:<3d} gc={row['grad_ckpt']:3s} "
              f"{row['status']}")  # fmt: skip
        return
    print(f"  {row['precision']:5s} B={row['micro_batch']:<3d} gc={row['grad_ckpt']:3s} "
          f"RL {row['rl_step_ms']:8.1f} ms {row['rl_tokens_per_s']:>9,d} tok/s "
          f"MFU {row['rl_mfu_pct']:5.1f}% | SFT {row['sft_step_ms']:8.1f} ms "
          f"{row['sft_tokens_per_s']:>9,d} tok/s MFU {row['sft_mfu_pct']:5.1f}% | "
          f"peak {row.get('peak_gib', 'n/a')} GiB")  # fmt: skip


def run_benchmark(args: argparse.Namespace, device: torch.device, report: dict) -> None:
    """Part 1+2: matmul peak, then the sweep; fills report in place."""
    peak_dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    peak = measure_matmul_tflops(device, peak_dtype, args.matmul_size, args.matmul_iters)
    report["matmul"] = {
        "n": args.matmul_size,
        "dtype": str(peak_dtype),
        "tflops": float(f"{peak:.4g}"),
    }
    print(f"[peak] {args.matmul_size}^3 {peak_dtype} matmul: {peak:.4g} TFLOP/s (best of 3 rounds)")
    config = model_config(args, args.layers)
    gcs = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    rows = []
    print(f"[bench] {FLOPS_FORMULA}")
    for precision in args.precision:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        t0 = time.perf_counter()
        model = build_model(config, device, dtype)
        if args.compile:
            for layer in model.model.layers:
                layer.compile()
        dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}))
        n_params = sum(p.numel() for p in model.parameters())
        n_layer_params = sum(p.numel() for p in model.model.layers.parameters())
        print(f"[bench] {precision}: {n_params / 1e6:.1f}M params ({n_layer_params / 1e6:.1f}M in "
              f"decoder layers), params {dtypes}, attn={model.config._attn_implementation}, "
              f"init {time.perf_counter() - t0:.1f} s")  # fmt: skip
        for mb in args.micro_batch:
            for gc in gcs:
                rows.append(bench_one(model, config, n_layer_params, args, device, precision, mb,
                                      gc, peak))  # fmt: skip
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["bench"] = rows
    ok = [r for r in rows if r["status"] == "OK"]
    if ok:
        head, best = ok[0], max(ok, key=lambda r: r["rl_mfu_pct"])
        report.update(
            tokens_per_s_rl=head["rl_tokens_per_s"], tokens_per_s_sft=head["sft_tokens_per_s"],
            mfu_pct_rl=head["rl_mfu_pct"], mfu_pct_sft=head["sft_mfu_pct"],
            peak_gib=head.get("peak_gib"), best_mfu_pct_rl=best["rl_mfu_pct"],
            best_config={k: best[k] for k in ("precision", "micro_batch", "grad_ckpt")},
        )  # fmt: skip
        spec = spec_peak(report.get("device", ""))
        if spec and not args.cpu_smoke:
            report["mfu_pct_rl_vs_spec"] = round(head["rl_tflops"] / spec * 100, 1)
            report["spec_bf16_tflops"] = spec


def spec_peak(device_name: str) -> float | None:
    for key, value in SPEC_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


# ----------------------------------------------------------------------------------------------
# FSDP2 through Lightning's ModelParallelStrategy


def _import_lightning():
    """(lightning.pytorch module, ModelParallelStrategy or None, reason if None)."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    try:
        strategy_cls = pl.strategies.ModelParallelStrategy
    except AttributeError:
        return pl, None, f"ModelParallelStrategy not in {pl.__name__} {pl.__version__}"
    return pl, strategy_cls, None


def _import_fsdp2():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4-2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def make_fsdp_module(pl, config: Qwen2Config, args: argparse.Namespace, status: dict):
    """LightningModule: FSDP2 per layer + root, two AdamW, manual RL and SFT steps, generate."""
    fully_shard, MixedPrecisionPolicy = _import_fsdp2()

    def stage(name: str, fn):
        """Runs fn, records OK / FAIL (with the error) and its time in ms under `status`."""
        t0 = time.perf_counter()
        try:
            out = fn()
            status["stages"].setdefault(name, "OK")  # a FAIL from an earlier batch sticks
            return out
        except Exception as err:
            traceback.print_exc()
            status["stages"][name] = "FAIL: " + error_text(err)
            return None
        finally:
            status["ms"][name] = round((time.perf_counter() - t0) * 1e3, 1)

    class FSDP2Check(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.model = Qwen2ForCausalLM(config)  # fp32 master weights; sharded below
            self.pg_loss = PolicyGradientLoss(agg_mode="constant", entropy_coef=1e-4)
            self.sft_loss = SFTLoss(entropy_coef=1e-4)
            self._sharded = False

        def configure_model(self) -> None:
            if self._sharded:
                return
            mesh = self.device_mesh["data_parallel"]
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

            def shard():
                for layer in self.model.model.layers:
                    fully_shard(layer, mesh=mesh, mp_policy=mp)
                fully_shard(self.model, mesh=mesh, mp_policy=mp)
                kinds = {type(p).__name__ for p in self.model.parameters()}
                if kinds != {"DTensor"}:
                    raise RuntimeError(f"parameters not all DTensor after fully_shard: {kinds}")

            stage("shard", shard)
            self._sharded = True

        def configure_optimizers(self):
            params = list(self.model.parameters())
            return [torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01),
                    torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01)]  # fmt: skip

        def _logprobs(self, batch: dict, temperature: float):
            return policy_logprobs(
                self.model, batch["input_ids"], batch["attention_mask"],
                batch["response_mask"].shape[1], temperature=temperature, with_entropy=True,
                chunk_size=args.logprob_chunk or None,
            )  # fmt: skip

        def _update(self, loss: Tensor, opt, clip: float, key: str) -> None:
            self.manual_backward(loss)

            def clip_norm():
                norm = _full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
                if not torch.isfinite(norm):
                    raise RuntimeError(f"non-finite grad norm {norm.item()}")
                status[f"{key}_grad_norm"] = round(norm.item(), 4)

            stage("clip_grad_norm", clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def _rl(self, batch: dict) -> None:
            opt = self.optimizers()[0]
            # Temperature 0.7 so the logits-scaling path runs here (the bench uses --temperature).
            logp, ent = self._logprobs(batch, 0.7)
            loss, _ = self.pg_loss(logp, logp.detach(), batch["advantages"],
                                   batch["response_mask"], entropy=ent)  # fmt: skip
            self._update(loss, opt, 0.7, "rl")
            status["rl_loss"] = round(loss.item(), 5)

        def _sft(self, batch: dict) -> None:
            opt = self.optimizers()[1]
            logp, ent = self._logprobs(batch, 1.0)
            loss, _ = self.sft_loss(logp, batch["response_mask"], entropy=ent)
            self._update(loss, opt, 1.0, "sft")
            status["sft_loss"] = round(loss.item(), 5)

        def _generate(self, batch: dict) -> None:
            prompt = batch["input_ids"][:, : args.fsdp_prompt]
            with torch.no_grad():
                out = self.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                          max_new_tokens=4, do_sample=False, pad_token_id=0,
                                          use_cache=True)  # fmt: skip
            if out.shape != (prompt.shape[0], prompt.shape[1] + 4) or not torch.equal(
                out[:, : prompt.shape[1]], prompt
            ):
                raise RuntimeError(f"unexpected generate output shape {tuple(out.shape)}")
            status["generated"] = out[:, prompt.shape[1] :].tolist()

        def training_step(self, batch: dict, batch_idx: int) -> None:
            first = _local(next(iter(self.model.parameters()))).detach().clone()
            for name, fn in (("rl_step", self._rl), ("sft_step", self._sft)):
                sync(self.device)
                stage(name, lambda fn=fn: (fn(batch), sync(self.device)))
            after = _local(next(iter(self.model.parameters()))).detach()
            status["params_updated"] = not torch.equal(first, after)
            if batch_idx == args.fsdp_batches - 1:
                stage("generate", lambda: self._generate(batch))
            status["step_ms_by_batch"].append(
                {k: status["ms"].get(k) for k in ("rl_step", "sft_step")}
            )

    return FSDP2Check


def run_fsdp2(args: argparse.Namespace, device: torch.device) -> dict:
    """Part 3: returns {"status", "stages", "ms", ...}."""
    status: dict = {"stages": {}, "ms": {}, "step_ms_by_batch": []}
    pl, strategy_cls, reason = _import_lightning()
    status["lightning"] = f"{pl.__name__} {pl.__version__}"
    if strategy_cls is None:
        status["status"] = "SKIP: " + reason
        return status
    if args.cpu_smoke and not torch.distributed.is_gloo_available():
        status["status"] = "SKIP: gloo backend not available on this CPU build"
        return status
    config = model_config(args, args.fsdp_layers)
    mb, prompt, resp = (2, 8, 16) if args.cpu_smoke else (4, 128, 256)
    args.fsdp_prompt = prompt
    batches = []
    for _ in range(args.fsdp_batches):
        b = make_batch(mb, prompt, resp, config.vocab_size, torch.device("cpu"))
        batches.append({"input_ids": b.input_ids, "attention_mask": b.attention_mask,
                        "response_mask": b.response_mask, "advantages": b.advantages})  # fmt: skip
    try:
        module = make_fsdp_module(pl, config, args, status)()
        trainer = pl.Trainer(
            accelerator=device.type, devices=1,
            strategy=strategy_cls(data_parallel_size=1, tensor_parallel_size=1),
            max_epochs=1, limit_train_batches=args.fsdp_batches, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, use_distributed_sampler=False,
        )  # fmt: skip
        t0 = time.perf_counter()
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        status["fit_s"] = round(time.perf_counter() - t0, 1)
        status["stages"]["trainer_fit"] = "OK"
    except Exception as err:
        traceback.print_exc()
        status["stages"]["trainer_fit"] = "FAIL: " + error_text(err)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    expected = ["shard", "rl_step", "sft_step", "clip_grad_norm", "generate", "trainer_fit"]
    for name in expected:
        status["stages"].setdefault(name, "FAIL: not reached")
    if not status.get("params_updated"):
        status["stages"]["params_updated"] = "FAIL: first parameter shard unchanged"
    else:
        status["stages"]["params_updated"] = "OK"
    failed = [k for k, v in status["stages"].items() if v != "OK"]
    status["status"] = "OK" if not failed else "FAIL: " + ", ".join(failed)
    status["model"] = f"Qwen2 {config.num_hidden_layers} layers, B={mb}, P={prompt}, R={resp}"
    return status


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
