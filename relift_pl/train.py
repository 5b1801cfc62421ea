"""``train(cfg)``: builds every object from the Hydra config and runs Lightning's ``fit``."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from callbacks.evaluation import BenchmarkEvaluation
from relift_pl.cli import say
from relift_pl.data.openr1_sample import openr1_sample
from relift_pl.loggers import ContinuingCSVLogger, LogContinuation
from relift_pl.models import load_policy, load_tokenizer, resolve_model_path
from relift_pl.module import ReLIFTModule
from relift_pl.quiet import quiet_known_noise
from relift_pl.run_folder import (
    RunFolderCheck,
    RunFolderError,
    launched_world_size,
    register_resolvers,
    resolve_resume,
    run_folder_in_use,
    unwritable_line,
)
from relift_pl.stop_tokens import apply_stop_tokens
from relift_pl.strategies import shards_checkpoints
from relift_pl.summary import RANDOM_WEIGHTS_NOTE, RunSummary
from relift_pl.validation import CheckedConfig, check_config, instantiate_checked

ROOT = Path(__file__).resolve().parents[1]
if not OmegaConf.has_resolver("relift_root"):
    OmegaConf.register_new_resolver("relift_root", lambda: str(ROOT))
if not OmegaConf.has_resolver("openr1_sample"):  # a local parquet in the OpenR1 schema
    OmegaConf.register_new_resolver("openr1_sample", openr1_sample)
register_resolvers()  # hydra.run.dir and the per-rank logs of a multi-rank launch


def build(
    cfg: DictConfig, training: bool = False, checked: CheckedConfig | None = None
) -> tuple[L.Trainer, ReLIFTModule, L.LightningDataModule]:
    """Instantiates trainer, module and datamodule (no training); tests use it too.

    ``training``: the caller will optimize (fit does; evaluate.py does not), so low-precision
    master weights are refused. ``checked``: what :func:`check_config` returned, if the caller
    ran it already.
    """
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    quiet_known_noise(resuming=bool(cfg.get("ckpt_path")))
    # Every config check first, so a bad value fails before a (large) model loads or is built.
    checked = checked or check_config(cfg, training)
    algorithm, sampling = checked.algorithm, checked.sampling
    callbacks = [
        instantiate_checked(node, f"callbacks.{name}")
        for name, node in cfg.callbacks.items() if node is not None
    ]
    loggers = [
        instantiate_checked(node, f"logger.{name}")
        for name, node in (cfg.logger or {}).items() if node is not None
    ]
    if any(isinstance(lg, ContinuingCSVLogger) for lg in loggers):
        # The logger keeps or replaces metrics.csv by resume, before anything logs.
        callbacks.insert(0, LogContinuation())
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    model_path = resolve_model_path(cfg.model.name_or_path, instantiate(cfg.model.get("build")))
    # Seeded after the (possibly freshly built) base exists: building it draws random numbers.
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    # Before the policy: its chat-template check and notes come before the weights load.
    datamodule = instantiate_checked(cfg.data, "data", tokenizer=tokenizer)
    policy = load_policy(
        model_path,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        attn_implementation=cfg.model.get("attn_implementation"),
        config_overrides=_plain(cfg.model.get("config_overrides")),
    )
    # Stop on the chat template's end-of-turn token too (read by both engines and the export).
    apply_stop_tokens(policy, tokenizer, datamodule.template)
    module = ReLIFTModule(
        policy=policy,
        tokenizer=tokenizer,
        algorithm=algorithm,
        rollout_engine=instantiate(cfg.rollout.engine),
        reward_fn=instantiate(cfg.reward),
        sampling=sampling,
        max_steps=cfg.max_steps,
        max_logprob_diff=cfg.rollout.get("max_logprob_diff"),
        max_logprob_diff_mean=cfg.rollout.get("max_logprob_diff_mean"),
        tis_cap=cfg.rollout.get("tis_cap"),
        seed=cfg.seed,
    )
    return trainer, module, datamodule


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if node else None


@dataclass
class FitResult:
    trainer: L.Trainer
    module: ReLIFTModule
    datamodule: L.LightningDataModule
    summary: RunSummary


def train(cfg: DictConfig) -> RunSummary:
    """Runs a whole training job and returns (and prints) its summary."""
    return fit(cfg).summary


def fit(cfg: DictConfig) -> FitResult:
    """Like :func:`train`, but also returns the trainer, module and datamodule (for tests)."""
    started = time.time()
    # The config checks first: a bad value stops before the run directory is announced (train.py
    # then removes the folder Hydra made for it).
    checked = check_config(cfg, training=True)
    os.makedirs(cfg.paths.output_dir, exist_ok=True)
    # A run folder this rank cannot write (it runs in a temporary one meanwhile): alone, stop
    # now; with other ranks, at set-up on every rank (RunFolderCheck), not here alone.
    folder, write_error = run_folder_in_use(cfg.paths.output_dir)
    if write_error and launched_world_size() <= 1:
        raise RunFolderError(unwritable_line(0, socket.gethostname(), folder, write_error))
    # Before building: a missing or broken checkpoint fails before the model loads (under a
    # multi-rank launch, on every rank at set-up: RunFolderCheck).
    ckpt_path, resume_problem = resolve_resume(
        cfg.get("ckpt_path"), cfg.paths.output_dir, sharded=shards_checkpoints(cfg.trainer)
    )
    say(f"run directory: {folder}")
    trainer, module, datamodule = build(cfg, training=True, checked=checked)
    trainer.callbacks.insert(0, RunFolderCheck(folder, resume_problem, write_error))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    evaluation = next((c for c in trainer.callbacks if isinstance(c, BenchmarkEvaluation)), None)
    # "before" is the step-0 evaluation only, "after" the newest later one (either may be None).
    history = evaluation.history if evaluation else []
    before, after_step, after = RunSummary.before_and_after(history)
    eval_sets = getattr(datamodule, "eval_sets", None) or {}
    summary = RunSummary(
        before=before,
        after=after,
        after_step=after_step,
        preempted=module.preempted,
        resumed=ckpt_path is not None,
        steps=module.step_count,
        rl_steps=module.rl_step,
        sft_steps=module.sft_step,
        demos_used=len(module.demos_used),
        demos_available=datamodule.demos_available,
        wall_seconds=time.time() - started,
        k={name: evaluation.k_of(name) for name in eval_sets} if evaluation else {},
        extra=dict(module.time_totals),  # where the time went, and the peak memory
        note=RANDOM_WEIGHTS_NOTE if cfg.model.get("random_weights") else None,
    )
    if trainer.is_global_zero:
        summary.print()
        summary.save(os.path.join(cfg.paths.output_dir, "summary.json"))
    return FitResult(trainer, module, datamodule, summary)
