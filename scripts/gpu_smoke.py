#!/usr/bin/env python3
"""The first thing to run on a new GPU machine: the real ReLIFTModule under the real Lightning
strategies and precision plugins, each stage in its own process (one failure does not hide the
others), one JSON line per stage in ``<out>/gpu_smoke.jsonl``. About 2 minutes.

    python scripts/gpu_smoke.py --out /tmp/smoke          # on the GPU machine
    python scripts/gpu_smoke.py --cpu --out /tmp/smoke    # the same stages on CPU (CI runs this)

Stages (a tiny random Qwen2 built from config; the toy world's rows; a stand-in reward):
- ``sdpa_backward``: after ``ReLIFTModule.setup``, masked bf16 attention at a length of 64 mod
  128 with very negative scores has a finite backward (cuDNN's kernel returns NaN there on
  H100/H200, pytorch#196678; setup turns it off).
- ``bf16_true``: one GPU, ``precision=bf16-true``: an RL and an SFT step apply; the rotary
  frequencies stay float32 after Lightning's conversion; parameters are bf16.
- ``bf16_mixed``: one GPU, ``bf16-mixed`` with the token budget and the fused log-prob head:
  parameters and both AdamW states stay float32, and one lr-1e-6 step moves >= 99% of them.
- ``fsdp2``: ``relift_pl.strategies.ModelParallelStrategy`` (1 GPU; 2 gloo ranks with --cpu),
  bf16-mixed with fp32 masters, the SFT AdamW offloaded, a sharded checkpoint, then a resumed
  fit from it: the offloaded state is on the CPU after the resume and after the SFT step.
- ``hf_loop``: the HF engine's sampling loop (on CUDA it checks for the end every 8 tokens)
  gives the same tokens as ``generate`` for the same seed, responses ending early included.

Needs only torch, transformers, lightning (and tokenizers, numpy): no hydra, datasets,
math-verify or vllm, which the GPU image lacks. The reward is a stand-in (a response's length
parity): this smoke tests the update path, not grading.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("sdpa_backward", "bf16_true", "bf16_mixed", "fsdp2", "hf_loop")
STAGE_TIMEOUT_S = 240


# -- pieces every stage uses --------------------------------------------------------------------
def tiny_policy_dir(cache: Path) -> Path:
    from relift_pl.toy.tiny_qwen import ensure_tiny_qwen

    return ensure_tiny_qwen(cache, vocab_size=512, hidden_size=64, num_heads=2, num_layers=2,
                            intermediate_size=128)  # fmt: skip


class ParityReward:
    """Stand-in reward (no math-verify on the GPU image): 1 for an even-length response."""

    def __call__(self, responses, golds, modes=None):
        from types import SimpleNamespace

        return SimpleNamespace(rewards=[float(len(r) % 2 == 0) for r in responses], timeouts=0, failures=0)

    def close(self) -> None:
        pass


def build(cache: Path, out: Path, *, precision: str, strategy="auto", devices=1, accelerator="gpu",
          lr: float = 1e-4, sft_lr: float | None = None, steps: int = 2,
          algo_overrides: dict | None = None, callbacks=()):
    """A trainer, module and datamodule as train.py builds them, without Hydra."""
    import functools

    import lightning as L
    import torch

    from callbacks import PreemptionCheckpoint
    from callbacks.hard_question_mining import HardQuestionMining
    from relift_pl.algorithms import PolicyGradientLoss, SFTLoss
    from relift_pl.checkpoint import TrainingStepCheckpoint
    from relift_pl.config import AlgorithmConfig
    from relift_pl.data import ReLIFTDataModule
    from relift_pl.models import load_policy, load_tokenizer
    from relift_pl.module import ReLIFTModule
    from relift_pl.rollout.base import SamplingParams
    from relift_pl.rollout.hf import HFRolloutEngine
    from relift_pl.stop_tokens import apply_stop_tokens
    from relift_pl.toy.world import make_rows

    path = str(tiny_policy_dir(cache))
    tokenizer = load_tokenizer(path)
    policy = load_policy(path, dtype="float32", gradient_checkpointing=True, attn_implementation="sdpa")
    datamodule = ReLIFTDataModule(
        train_rows=functools.partial(make_rows, split="train", levels=[4], n_per_level=64, seed=0),
        tokenizer=tokenizer, batch_size=4, chat_template="qwen_think", max_prompt_length=64,
        max_demo_length=64,
    )  # fmt: skip
    apply_stop_tokens(policy, tokenizer, datamodule.template)
    # Every prompt's demonstration enters the buffer (M = B): an SFT step follows every RL step.
    algo = AlgorithmConfig(
        group_size=4, buffer_threshold=4, buffer_selection="all", micro_batch_size=8,
        sft_micro_batch_size=4,
        pg_loss=PolicyGradientLoss(loss_constant=24, entropy_coef=1e-3), sft_loss=SFTLoss(),
        rl_optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
        sft_optimizer=functools.partial(torch.optim.AdamW, lr=lr if sft_lr is None else sft_lr,
                                        weight_decay=0.01),
        **(algo_overrides or {}),
    )  # fmt: skip
    module = ReLIFTModule(
        policy, tokenizer, algo, rollout_engine=HFRolloutEngine, reward_fn=ParityReward,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=24), max_steps=steps, seed=0,
    )  # fmt: skip
    checkpoints = TrainingStepCheckpoint(dirpath=str(out / "checkpoints"), filename="step-{step:06.0f}",
                                         save_last=True, save_top_k=-1, every_n_train_steps=1,
                                         enable_version_counter=False)  # fmt: skip
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
        max_epochs=-1, max_steps=-1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        default_root_dir=str(out),
        callbacks=[HardQuestionMining(), PreemptionCheckpoint(str(out / "checkpoints")), checkpoints,
                   *callbacks],
    )  # fmt: skip
    return trainer, module, datamodule


def moved_fraction(before: dict, after: dict) -> float:
    """Share of entries that changed, input embeddings left out (rows of tokens that never occur
    get no gradient in any precision)."""
    keys = [k for k in before if before[k].is_floating_point() and "embed_tokens" not in k]
    return sum(int((after[k] != before[k]).sum()) for k in keys) / sum(before[k].numel() for k in keys)


def optimizer_dtypes(module) -> list[str]:
    optimizers = module.optimizers(use_pl_optimizer=False)
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    return sorted({str(v.dtype) for o in optimizers for s in o.state.values() for k, v in s.items()
                   if hasattr(v, "dtype") and k != "step"})  # fmt: skip


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


# -- stages -------------------------------------------------------------------------------------
def stage_sdpa_backward(args, cache: Path, out: Path) -> dict:
    import math

    import torch
    import torch.nn.functional as F

    trainer, module, dm = build(cache, out, precision="bf16-mixed", accelerator=args.accelerator)
    module.trainer = trainer
    module.setup("fit")  # turns cuDNN attention off on CUDA
    module.teardown("fit")
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    torch.manual_seed(0)
    length, dim = 192, 64  # 192 % 128 == 64
    q = torch.randn(1, 2, length, dim, device=device, dtype=torch.bfloat16) * 0.1
    k = torch.randn(1, 2, length, dim, device=device, dtype=torch.bfloat16) * 0.1
    v = torch.randn(1, 2, length, dim, device=device, dtype=torch.bfloat16)
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(dim)  # every row's logsumexp far below -88.7
    q.requires_grad_()
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    mask[..., :, :8] = False  # left padding, as trimmed micro-batches have
    mask[..., :8, 0] = True  # (padded query rows see one key, as transformers' mask lets them)
    out_ = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out_.backward(torch.randn_like(out_))
    bad = int((~torch.isfinite(q.grad)).sum())
    expect(bad == 0, f"{bad} non-finite attention gradients")
    return {"cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled() if device.type == "cuda" else None}


def stage_bf16_true(args, cache: Path, out: Path) -> dict:
    import torch

    trainer, module, dm = build(cache, out, precision="bf16-true", accelerator=args.accelerator)
    trainer.fit(module, datamodule=dm)
    rotary = {n: str(b.dtype) for n, b in module.policy.named_buffers() if n.endswith("inv_freq")}
    expect(rotary and set(rotary.values()) == {"torch.float32"}, f"rotary buffers {rotary}")
    expect(next(module.policy.parameters()).dtype == torch.bfloat16, "bf16-true did not convert")
    expect(module.sft_step >= 1 and module.skipped_steps == 0, f"sft {module.sft_step}, skipped {module.skipped_steps}")
    return {"rl_steps": module.rl_step, "sft_steps": module.sft_step, "weights_version": module.weights_version}


def stage_bf16_mixed(args, cache: Path, out: Path) -> dict:
    import torch

    algo = {"max_tokens_per_micro_batch": 96, "logprob_token_chunk": 16}
    # SFT lr 0: the SFT AdamW steps (its state is checked) but moves nothing, so what moved is
    # one RL step's doing (two fresh AdamWs' first steps are +-lr each and can cancel exactly).
    trainer, module, dm = build(cache, out, precision="bf16-mixed", accelerator=args.accelerator,
                                lr=1e-6, sft_lr=0.0, steps=1, algo_overrides=algo)  # fmt: skip
    before = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    trainer.fit(module, datamodule=dm)
    after = {k: v.detach().cpu() for k, v in module.policy.state_dict().items()}
    before = {k: v.cpu() for k, v in before.items()}
    moved = moved_fraction(before, after)
    expect(next(module.policy.parameters()).dtype == torch.float32, "master weights are not fp32")
    expect(optimizer_dtypes(module) == ["torch.float32"], f"optimizer states {optimizer_dtypes(module)}")
    expect(moved >= 0.99, f"one lr-1e-6 step moved only {moved:.2%} of the entries")
    return {"moved_fraction": moved, "weights_version": module.weights_version}


def stage_fsdp2(args, cache: Path, out: Path) -> dict:
    import lightning as L
    import torch

    from relift_pl.strategies import ModelParallelStrategy

    devices = 1 if args.accelerator == "gpu" else 2

    class OffloadProbe(L.Callback):
        """Where the SFT AdamW's moments are when training starts and after each step."""

        def __init__(self) -> None:
            self.devices: list[set[str]] = []

        def _record(self, module) -> None:
            sft = module.optimizer("sft").optimizer
            self.devices.append({v.device.type for s in sft.state.values() for k, v in s.items()
                                 if torch.is_tensor(v) and k != "step"})  # fmt: skip

        def on_train_start(self, trainer, module) -> None:
            self._record(module)

        def on_train_batch_end(self, trainer, module, *a) -> None:
            self._record(module)

    def strategy():
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)

    algo = {"offload_sft_optimizer": True, "max_tokens_per_micro_batch": 96}
    trainer, module, dm = build(cache, out, precision="bf16-mixed", strategy=strategy(),
                                devices=devices, accelerator=args.accelerator, algo_overrides=algo)
    trainer.fit(module, datamodule=dm)
    last = out / "checkpoints" / "last.ckpt"
    expect(last.is_dir() and (last / "meta.pt").exists(), "no sharded last.ckpt folder")
    probe = OffloadProbe()
    trainer, module, dm = build(cache, out, precision="bf16-mixed", strategy=strategy(),
                                devices=devices, accelerator=args.accelerator, steps=3,
                                algo_overrides=algo, callbacks=[probe])  # fmt: skip
    trainer.fit(module, datamodule=dm, ckpt_path=str(last))
    expect(module.step_count == 3, f"resumed to step {module.step_count}, expected 3")
    expect(probe.devices and all(d == {"cpu"} for d in probe.devices), f"SFT AdamW state on {probe.devices}")
    expect(next(module.policy.parameters()).dtype == torch.float32, "FSDP2 shards are not fp32")
    return {"world_size": trainer.world_size, "sft_steps": module.sft_step,
            "offload_devices": [sorted(d) for d in probe.devices]}  # fmt: skip


def stage_hf_loop(args, cache: Path, out: Path) -> dict:
    import torch

    from relift_pl.models import load_policy, load_tokenizer
    from relift_pl.rollout.base import SamplingParams
    from relift_pl.rollout.hf import HFRolloutEngine

    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    path = str(tiny_policy_dir(cache))
    tokenizer = load_tokenizer(path)
    policy = load_policy(path).to(device)
    policy.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]  # frequent: rows end early
    prompts = [tokenizer("12+5=", add_special_tokens=False)["input_ids"], [3, 4, 5, 6, 7, 8]]
    sampling = SamplingParams(n=4, temperature=1.0, top_k=50, max_new_tokens=40)
    results = {}
    for decode in ("loop", "generate"):
        engine = HFRolloutEngine(decode=decode)
        engine.bind(policy, tokenizer)
        torch.manual_seed(123)
        results[decode] = engine.generate(prompts, sampling)
    loop, ref = results["loop"], results["generate"]
    expect(torch.equal(loop.response_ids, ref.response_ids), "loop and generate sampled differently")
    expect(loop.finish_reasons == ref.finish_reasons, "finish reasons differ")
    ended = loop.finish_reasons.count("stop")
    return {"responses": len(loop.finish_reasons), "ended_early": ended,
            "lengths": loop.response_lengths.tolist()}  # fmt: skip


# -- driver -------------------------------------------------------------------------------------
def run_stage(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1 if args.accelerator == "cpu" else torch.get_num_threads())
    cache = Path(args.cache)
    out = Path(args.work) / args.stage
    started = time.perf_counter()
    record = {"stage": args.stage, "accelerator": args.accelerator}
    if args.accelerator == "gpu":
        record["device"] = torch.cuda.get_device_name(0)
    try:
        record |= {"ok": True, **globals()[f"stage_{args.stage}"](args, cache, out)}
    except BaseException as err:  # report, do not hide: the next stage still runs
        record |= {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
    record["seconds"] = round(time.perf_counter() - started, 1)
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0:
        with open(Path(args.out) / "gpu_smoke.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0 if record["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_smoke.jsonl")
    parser.add_argument("--cpu", action="store_true", help="run the stages on CPU (CI)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.accelerator = "cpu" if args.cpu else "gpu"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.stage:
        return run_stage(args)
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke-"))
    cache = Path(os.environ.get("RELIFT_CACHE_DIR", ROOT / ".cache")) / "gpu_smoke"
    failed = 0
    for stage in args.stages:
        command = [sys.executable, __file__, "--out", args.out, "--stage", stage, "--work", str(work),
                   "--cache", str(cache), *(["--cpu"] if args.cpu else [])]  # fmt: skip
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=ROOT, timeout=STAGE_TIMEOUT_S, capture_output=True, text=True)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            rc, tail = -1, f"timed out after {STAGE_TIMEOUT_S} s"
        lines = (Path(args.out) / "gpu_smoke.jsonl").read_text().splitlines() if (Path(args.out) / "gpu_smoke.jsonl").exists() else []
        reported = any(json.loads(line)["stage"] == stage for line in lines)
        if not reported:  # died before it could write (a crash, a timeout): say so
            with open(Path(args.out) / "gpu_smoke.jsonl", "a") as handle:
                handle.write(json.dumps({"stage": stage, "ok": False, "error": f"rc {rc}", "tail": tail,
                                         "seconds": round(time.perf_counter() - started, 1)}) + "\n")
        failed += rc != 0 or not reported
        print(f"{stage}: {'ok' if rc == 0 and reported else 'FAILED'} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
