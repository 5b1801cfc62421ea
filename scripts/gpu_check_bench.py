"""scripts/gpu_check.py parts 1-2: the matmul peak, then the single-device update-phase benchmark
(RL and SFT steps, no Lightning) over a sweep of micro-batch sizes, checkpointing and precision."""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
import traceback

import torch
from gpu_check_model import (
    GIB,
    Batch,
    PolicyGradientLoss,
    SFTLoss,
    build_model,
    error_text,
    make_batch,
    model_config,
    policy_logprobs,
    sync,
)
from torch import Tensor, nn
from transformers import Qwen2Config

# Dense bf16 tensor-core peaks from the datasheets (TFLOP/s, no sparsity), for a second MFU figure.
SPEC_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                    "A100": 312.0}  # fmt: skip
FLOPS_FORMULA = (
    "model FLOPs/step = 6*N_layers*B*(P+R) + 6*h*V*B*(R+1) + 12*L*h*B*(P+R)^2 "
    "[N_layers = decoder-layer params; lm_head counted on the R+1 kept positions (logits_to_keep); "
    "attention non-causal (PaLM convention); checkpoint recompute not counted: MFU, not HFU]"
)


def train_flops(config: Qwen2Config, n_layer_params: int, mb: int, prompt: int, resp: int) -> float:
    """Model FLOPs of one forward+backward, see FLOPS_FORMULA."""
    seq, h = prompt + resp, config.hidden_size
    dense = 6 * n_layer_params * mb * seq
    head = 6 * h * config.vocab_size * mb * (resp + 1)
    attn = 12 * config.num_hidden_layers * h * mb * seq * seq
    return float(dense + head + attn)


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
