#!/usr/bin/env python3
"""relift-pl's GRPO step on the TRL baseline workload (``../shared/bench/trl_baseline``).

    python benchmarks/run_relift.py --workload .trlbench/workload [--rollout hf|vllm] [--sft]

Runs the real training step (``ReLIFTModule.training_step`` under a Lightning ``Trainer``) on the
work ``run_trl.py`` times, holding equal everything its README lists: the same model directory
(``from_pretrained``, fp32), the same tokenizer (``PreTrainedTokenizerFast``, prompts verbatim: the
workload tokenizer's chat template is the identity), B=8 prompts x G=8 samples in one rollout,
exactly 64 new tokens (``min_new_tokens``), temperature 1 / top_p 1 / top_k off, one AdamW(fused)
step per batch (lr 1e-5, wd 0, clip 1.0), the dr_grpo loss (token sum / (B*G*64)), no KL, no
std scaling, no entropy bonus, the ``\\boxed{answer}`` substring reward, 2 threads, 10 steps with
the first 2 excluded, seed 0. ``--sft`` is ReLIFT: the same plus the SFT step on the buffered
hardest questions (every prompt, since the random model never scores): a second figure, with no
TRL counterpart.

The last stdout line is one JSON object with run_trl.py's keys (``impl`` names the variant) plus
our own split of the step: ``rollout_s_per_step`` (generate, with the vLLM weight push),
``reward_s_per_step``, ``logprob_forward_s_per_step``, ``backward_s_per_step``,
``optimizer_s_per_step`` (clip + AdamW), ``sft_s_per_step`` and ``other_s_per_step`` (the rest:
Lightning, data, metrics).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default=str(ROOT / ".trlbench" / "workload"))
    ap.add_argument("--rollout", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--sft", action="store_true", help="ReLIFT: include the SFT step")
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--max_prompt_length", type=int, default=64)
    ap.add_argument("--max_completion_length", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--natural_eos", action="store_true")
    ap.add_argument("--kv_cache_mib", type=int, default=64, help="vLLM KV cache (CPU)")
    ap.add_argument("--attn_implementation", default=None,
                    help="model.attn_implementation (default: sdpa_gqa on sdpa models)")
    ap.add_argument(
        "--overrides", nargs="*", default=[],
        help="extra Hydra overrides (e.g. algorithm.pg_loss.entropy_coef=0.001 rollout.engine.decode=generate)",
    )
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of one step here")
    return ap.parse_args(argv)


class BoxedReward:
    """1.0 if ``\\boxed{answer}`` occurs in the response text, else 0.0 (run_trl.py's reward)."""

    def __call__(self, responses: list[str], golds: list[str]):
        from relift_pl.rewards import RewardOutput

        rewards = [1.0 if ("\\boxed{" + g + "}") in r else 0.0 for r, g in zip(responses, golds)]
        return RewardOutput(rewards=rewards, timeouts=0, failures=0)


def compose(args: argparse.Namespace):
    """The project's own config groups, set to the workload's values."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import relift_pl.train  # noqa: F401  (registers the config resolvers)

    overrides = [
        "experiment=toy",  # the fixed workload of the TRL comparison
        f"algorithm={'relift' if args.sft else 'grpo'}",
        f"rollout={args.rollout}",
        "trainer=cpu",
        "paths.output_dir=" + tempfile.mkdtemp(prefix="relift-bench-"),
        f"seed={args.seed}",
        f"algorithm.group_size={args.G}",
        f"algorithm.micro_batch_size={args.B * args.G}",  # one forward/backward, as TRL does
        "algorithm.num_mini_batches=1",
        "algorithm.scale_advantages_by_std=false",
        "algorithm.rl_grad_clip=1.0",
        "algorithm.pg_loss.clip=false",
        "algorithm.pg_loss.agg_mode=constant",  # dr_grpo: sum / (n_seqs * max_completion_length)
        f"algorithm.pg_loss.loss_constant={args.max_completion_length}",
        "algorithm.pg_loss.entropy_coef=0.0",
        "algorithm.pg_loss.kl_coef=0.0",
        f"algorithm.rl_optimizer.lr={args.lr}",
        "algorithm.rl_optimizer.weight_decay=0.0",
        "+algorithm.rl_optimizer.fused=true",
        f"algorithm.sft_optimizer.lr={args.lr}",
        "algorithm.sft_optimizer.weight_decay=0.0",
        "+algorithm.sft_optimizer.fused=true",
        f"algorithm.buffer_threshold={args.B}",
        f"algorithm.sft_micro_batch_size={args.B}",
        f"rollout.sampling.temperature={args.temperature}",
        "rollout.sampling.top_p=1.0",
        "rollout.sampling.top_k=0",
        f"rollout.sampling.max_new_tokens={args.max_completion_length}",
        f"rollout.sampling.min_new_tokens={0 if args.natural_eos else args.max_completion_length}",
        "model.dtype=float32",
        "model.trust_remote_code=false",
        *args.overrides,
    ]
    if args.rollout == "vllm":
        overrides += [
            "rollout.engine.model=" + args.workload,
            "rollout.engine.dtype=float32",
            f"rollout.engine.kv_cache_memory_bytes={args.kv_cache_mib << 20}",
            f"rollout.engine.max_model_len={args.max_prompt_length + args.max_completion_length}",
            f"rollout.engine.seed={args.seed}",
        ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


class Clock:
    """Seconds spent in wrapped callables, per training step; inside a ``phase`` wrapper (the SFT
    step) inner names get the phase's prefix, so RL and SFT passes are counted apart."""

    def __init__(self) -> None:
        self.step: dict[str, float] = defaultdict(float)
        self.prefix = ""

    def wrap(self, name: str, fn, phase: bool = False):
        @functools.wraps(fn)
        def timed(*a, **kw):
            key = self.prefix + name
            outer = self.prefix
            if phase:
                self.prefix = name + "."
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.step[key] += time.perf_counter() - started
                self.prefix = outer

        return timed


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    import lightning as L
    import transformers
    from hydra.utils import instantiate
    from transformers import PreTrainedTokenizerFast

    from callbacks import HardQuestionMining, VLLMWeightSync
    from relift_pl.data import ReLIFTDataModule
    from relift_pl.models import load_policy
    from relift_pl.module import ReLIFTModule
    from relift_pl.validation import rollout_sampling

    cfg = compose(args)
    wl = args.workload
    # NOT AutoTokenizer (relift_pl.models.load_tokenizer): in transformers 5.x it returns a
    # Qwen2Tokenizer for this directory, which drops spaces and newlines (workload README).
    tokenizer = PreTrainedTokenizerFast.from_pretrained(wl, padding_side="left")
    # AutoModelForCausalLM.from_pretrained, as run_trl.py (the project's loader).
    policy = load_policy(wl, dtype="float32", attn_implementation=args.attn_implementation)
    algorithm = instantiate(cfg.algorithm)
    # Rows in the datamodule's schema; the SFT variant's demonstration is the workload's
    # solution ("a op b = c. \\boxed{c}"). The prompt field is used verbatim.
    with open(os.path.join(wl, "prompts.jsonl")) as f:
        records = [json.loads(line) for line in f]
    rows = lambda: [  # noqa: E731
        {"id": str(r["id"]), "problem": r["prompt"], "answer": r["answer"], "demonstration": r["solution"]}
        for r in records
    ]
    # The workload tokenizer's chat template is "{% for m in messages %}{{ m['content'] }}{% endfor %}":
    # the prompt field goes in verbatim (checked below).
    datamodule = ReLIFTDataModule(
        train_rows=rows, tokenizer=tokenizer, batch_size=args.B, chat_template="model",
        max_prompt_length=args.max_prompt_length, max_demo_length=256, seed=args.seed,
    )
    datamodule.setup("fit")
    first = datamodule.train_rows[0]
    assert first["prompt_ids"] == tokenizer(first["problem"], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(first["prompt_ids"]) == first["problem"], "prompt does not round-trip"
    plens = [len(r["prompt_ids"]) for r in datamodule.train_rows]
    assert max(plens) <= args.max_prompt_length

    clock = Clock()
    module = ReLIFTModule(
        policy=policy, tokenizer=tokenizer, algorithm=algorithm,
        rollout_engine=instantiate(cfg.rollout.engine),
        reward_fn=lambda: clock.wrap("reward", BoxedReward()),
        sampling=rollout_sampling(cfg), max_steps=args.steps,
    )
    module.generate = clock.wrap("rollout", module.generate)
    # The update units are module-level functions: time them where they are called.
    import relift_pl.module as module_unit
    from relift_pl.update import rl as rl_unit
    from relift_pl.update import sft as sft_unit

    module_unit.rl_update = clock.wrap("rl_update", module_unit.rl_update)
    module_unit.sft_update = clock.wrap("sft", module_unit.sft_update, phase=True)
    for unit in (rl_unit, sft_unit):
        for name, attr in (("logprob_forward", "micro_logprobs"), ("backward", "backward"),
                           ("optimizer", "optimizer_step")):
            if hasattr(unit, attr):
                setattr(unit, attr, clock.wrap(name, getattr(unit, attr)))

    rec: dict[str, list] = {"wall": [], "tokens": [], "completions": [], "split": [], "sft_steps": []}

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.t = time.perf_counter()
            self.sft = 0
            clock.step.clear()

        def on_rl_step_end(self, trainer, pl_module, record):
            responses = record.responses or []
            self.completions = len(responses)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            tokens = pl_module._bench_tokens
            rec["wall"].append(now - self.t)
            rec["tokens"].append(tokens)
            rec["completions"].append(self.completions)
            rec["split"].append(dict(clock.step))
            rec["sft_steps"].append(pl_module.sft_step - self.sft)
            self.sft = pl_module.sft_step
            clock.step.clear()
            self.t = now

    generate = module.generate

    def counting_generate(prompt_ids, sampling, purpose=None):
        batch = generate(prompt_ids, sampling, purpose)
        module._bench_tokens = int(batch.response_mask.sum())  # kept tokens, EOS included
        return batch

    module.generate = counting_generate

    sync = VLLMWeightSync()
    sync.on_before_rollout = clock.wrap("weight_sync", sync.on_before_rollout)  # inside "rollout"
    callbacks = [sync, Timer()]
    if args.sft:
        callbacks.insert(1, HardQuestionMining(seed=args.seed))
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, plugins=None,
    )
    profiler = None
    if args.profile:
        profiler = _StepProfiler(args.profile, step=args.warmup + 1)
        trainer.callbacks.append(profiler)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    total = time.perf_counter() - t0

    w = args.warmup
    walls, toks, comps, splits = rec["wall"][w:], rec["tokens"][w:], rec["completions"][w:], rec["split"][w:]
    assert walls, "no measured steps: raise --steps or lower --warmup"
    tot = sum(walls)
    mean = tot / len(walls)
    split = {k: sum(s.get(k, 0.0) for s in splits) / len(splits) for k in sorted({k for s in splits for k in s})}
    gen_s = split.get("rollout")
    rl = split.get("rl_update", 0.0)
    fwd, bwd, opt = (split.get(k, 0.0) for k in ("logprob_forward", "backward", "optimizer"))
    sft_s = split.get("sft", 0.0)
    prep_s = (gen_s or 0.0) + split.get("reward", 0.0)
    opt_obj = module.optimizers()
    opt_obj = (opt_obj[0] if isinstance(opt_obj, list) else opt_obj).optimizer
    impl = "relift-pl " + ("relift" if args.sft else "grpo") + f" rollout={args.rollout}"
    print("per-step wall (s):", [round(x, 3) for x in rec["wall"]], file=sys.stderr)
    print("per-step generated tokens:", rec["tokens"], file=sys.stderr)
    print("mean split of a measured step (s):", json.dumps({k: round(v, 4) for k, v in split.items()}),
          file=sys.stderr)
    result = {
        "impl": impl,
        "relift_pl_version": _version(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "lightning_version": L.__version__,
        "vllm_version": _vllm_version() if args.rollout == "vllm" else None,
        "threads": torch.get_num_threads(),
        "G": args.G,
        "B": args.B,
        "completions_per_step": args.B * args.G,
        "max_prompt_length": args.max_prompt_length,
        "max_completion_length": args.max_completion_length,
        "prompt_tokens_mean": sum(plens) / len(plens),
        "min_new_tokens": None if args.natural_eos else args.max_completion_length,
        "steps": args.steps,
        "measured_steps": len(walls),
        "sec_per_step_median": statistics.median(walls),
        "sec_per_step_mean": mean,
        "sec_per_step_min": min(walls),
        "sec_per_step_max": max(walls),
        "completions_per_s": sum(comps) / tot,
        "gen_tokens_per_s": sum(toks) / tot,
        "mean_completion_length": sum(toks) / max(1, sum(comps)),
        "generate_s_per_step": gen_s,
        "prepare_inputs_s_per_step": prep_s,
        "update_s_per_step": mean - prep_s,
        "loss_forward_s_per_step": fwd,
        "backward_optim_other_s_per_step": mean - prep_s - fwd,
        "generate_only_tokens_per_s": (sum(toks) / len(walls)) / gen_s if gen_s else None,
        "optimizer": f"{type(opt_obj).__name__}(fused={opt_obj.defaults.get('fused')}, "
                     f"betas={opt_obj.defaults.get('betas')})",
        "total_train_wall_s": total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        # Our own split (mean s per measured step).
        "rollout_s_per_step": gen_s,
        "weight_sync_s_per_step": split.get("weight_sync", 0.0),
        "reward_s_per_step": split.get("reward", 0.0),
        "logprob_forward_s_per_step": fwd,
        "backward_s_per_step": bwd,
        "optimizer_s_per_step": opt,
        "rl_update_other_s_per_step": rl - fwd - bwd - opt,
        "sft_s_per_step": sft_s,
        "sft_logprob_forward_s_per_step": split.get("sft.logprob_forward", 0.0),
        "sft_backward_s_per_step": split.get("sft.backward", 0.0),
        "sft_optimizer_s_per_step": split.get("sft.optimizer", 0.0),
        "sft_steps": sum(rec["sft_steps"][w:]),
        "other_s_per_step": mean - prep_s - rl - sft_s,
        "model_params": sum(p.numel() for p in policy.parameters()),
        "attn_implementation": policy.config._attn_implementation,
    }
    print(json.dumps(result))


class _StepProfiler:
    """torch.profiler over one training step (a Lightning callback, built lazily)."""

    def __new__(cls, path: str, step: int):
        import lightning as L
        from torch.profiler import ProfilerActivity, profile, record_function

        class StepProfiler(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == step:
                    self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
                    self.prof.__enter__()
                    self.rf = record_function("training_step")
                    self.rf.__enter__()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx == step:
                    self.rf.__exit__(None, None, None)
                    self.prof.__exit__(None, None, None)
                    table = self.prof.key_averages().table(sort_by="cpu_time_total", row_limit=60)
                    Path(path).write_text(table)
                    self.prof.export_chrome_trace(str(Path(path).with_suffix(".trace.json")))

        return StepProfiler()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("relift-pl")
    except Exception:
        return "unknown"


def _vllm_version() -> str | None:
    try:
        import vllm

        return vllm.__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
