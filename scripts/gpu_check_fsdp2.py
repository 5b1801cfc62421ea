"""scripts/gpu_check.py part 3: FSDP2 through Lightning's ModelParallelStrategy on one device
(fully_shard per layer + root, two AdamW, manual RL and SFT steps, a greedy generate)."""

from __future__ import annotations

import argparse
import time
import traceback

import torch
from gpu_check_model import (
    PolicyGradientLoss,
    SFTLoss,
    error_text,
    make_batch,
    model_config,
    policy_logprobs,
    sync,
)
from torch import Tensor
from transformers import Qwen2Config, Qwen2ForCausalLM


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
