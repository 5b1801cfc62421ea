"""``evaluate(cfg)``: scores a training run, a model directory or a checkpoint on the benchmarks.

It builds the policy, rollout engine, reward and eval sets exactly as training does
(:func:`relift_pl.train.build`) and scores them with the training run's own
:class:`callbacks.BenchmarkEvaluation`, so a number here and one logged during training mean the
same thing. With ``run_dir=<a train.py run folder>`` the run's saved config is the config (its
data, eval sets, sampling settings and engine) and its final weights are scored, so the numbers
are the run's final evaluation. It runs in one process (one CPU or one GPU).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from callbacks.evaluation import BenchmarkEvaluation, SetScore, metrics_of
from relift_pl.checkpoint import RESUMABLE_NAMES, check_checkpoint_file, resolve_ckpt_path
from relift_pl.config import ConfigError
from relift_pl.module import ReLIFTModule
from relift_pl.results import write_results
from relift_pl.summary import RANDOM_WEIGHTS_NOTE
from relift_pl.train import build
from relift_pl.untrusted import check_saved_config, load_distributed_checkpoint, load_weights_only

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    scores: list[SetScore]
    metrics: dict[str, float]
    """The logged values: ``val/<set>/avg@k``, ``val/<set>/pass@k``, ``val/avg``."""
    files: dict[str, Path]
    """``md``, ``csv``, ``png`` -> path."""


def load_checkpoint_weights(module: ReLIFTModule, ckpt_path: str) -> None:
    """Loads a train.py checkpoint's weights (and counters) into ``module``: a single file, or an
    FSDP2 sharded folder (only the policy's tensors are read from it, not the optimizers').

    Raises:
        ValueError: weights that do not fit the model.
    """
    path = check_checkpoint_file(ckpt_path)
    checkpoint = _load_sharded_weights(module, path) if path.is_dir() else load_weights_only(path)
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the weights in {ckpt_path} do not fit the configured model: pass the model= (and "
            f"model.* overrides) the run trained with, see .hydra/config.yaml next to its "
            f"checkpoints/ folder.\n{err}"
        ) from err
    if "relift" in checkpoint:
        module.on_load_checkpoint(checkpoint)  # step counters: metrics are logged at that step


def _load_sharded_weights(module: ReLIFTModule, folder: Path) -> dict:
    """``{"state_dict", "relift"}`` of a sharded checkpoint folder, read in this one process."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    state = {"state_dict": module.state_dict()}
    load_distributed_checkpoint(state, folder)  # reads just these keys
    meta = load_weights_only(folder / _METADATA_FILENAME)
    return {**state, "relift": meta.get("relift")} if "relift" in meta else state


FINAL_MODEL = "final_model"
"""A run's exported Hugging Face model (weights and tokenizer), preferred to its checkpoints."""
# This job's own settings, never the run's: where results go and how they are logged.
_JOB_KEYS = ("paths.output_dir", "logger", "run_dir", "ckpt_path")


def _raw(cfg: DictConfig, key: str):
    """The value at dotted ``key``, interpolations kept (they resolve in the config it joins)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return OmegaConf.to_container(node, resolve=False)[leaf]


def _command_line_overrides() -> list[str]:
    """The overrides of this ``evaluate.py`` job (none when not started by Hydra)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_folder_of(ckpt_path: str) -> Path | None:
    """The train.py run folder a checkpoint sits in (``<run>/checkpoints/<name>``, with the run's
    saved ``.hydra/config.yaml``); None for a checkpoint anywhere else."""
    path = Path(ckpt_path)
    run = path.parent.parent
    if path.parent.name == "checkpoints" and (run / ".hydra" / "config.yaml").is_file():
        return run
    return None


def run_config(cfg: DictConfig, overrides: Sequence[str] | None = None) -> DictConfig:
    """The config to score the run in ``cfg.run_dir`` with: its saved ``.hydra/config.yaml``,
    this job's output folder and logger, the explicit ``overrides`` on top, and its weights:
    ``ckpt_path`` if set, else ``final_model/`` if present, else the newer of
    ``checkpoints/{last,preempted}.ckpt`` (unless the overrides name ``model`` or
    ``model.name_or_path``).

    Args:
        cfg: this job's composed config (the overrides already applied to it).
        overrides: this job's command-line overrides; default: Hydra's record of them.
    """
    run_dir = Path(cfg.run_dir)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"run_dir={run_dir} has no .hydra/config.yaml: pass the folder of a train.py run "
            "(outputs/<date>/<time>, or its hydra.run.dir)"
        )
    run = OmegaConf.load(saved)
    devices, nodes = run.trainer.get("devices", 1), run.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and devices * int(nodes) > 1:
        log.warning(
            "run_dir=%s trained on %d ranks: its evaluations split the problems over ranks, each "
            "sampling with its own seed, so this one-process scoring draws other samples "
            "(comparable numbers, not identical ones)", run_dir, devices * int(nodes),
        )  # fmt: skip
    overrides = _command_line_overrides() if overrides is None else list(overrides)
    explicit = []
    for override in OverridesParser.create().parse_overrides(overrides):
        # A group override (trainer=gpu) replaces the node its package names; a value, its key.
        key = override.package or override.key_or_group.replace("/", ".")
        if key == "hydra" or key.startswith("hydra."):
            continue
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(run, parent) if parent else run
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
            continue
        missing = OmegaConf.select(cfg, key, default=KeyError, throw_on_resolution_failure=False)
        if missing is KeyError:
            raise ConfigError(
                f"run_dir={run_dir}: the override {override.input_line} sets keys across the "
                "config (a global group such as experiment=); scoring with the run's settings, "
                "override single keys"
            )
        explicit.append(key)
    # The folder may come from elsewhere: build nothing it names but the allowed classes.
    check_saved_config(run, saved, trusted_keys=[*_JOB_KEYS, *explicit])
    for key in dict.fromkeys([*_JOB_KEYS, *explicit]):
        OmegaConf.update(run, key, _raw(cfg, key), merge=False, force_add=True)
    if not cfg.get("ckpt_path") and not any(k in ("model", "model.name_or_path") for k in explicit):
        final = run_dir / FINAL_MODEL
        try:
            checkpoint = resolve_ckpt_path("last", run_dir)
        except FileNotFoundError:
            checkpoint = None
        # final_model/ unless a checkpoint is newer (the run was resumed past it and stopped).
        if final.is_dir() and (checkpoint is None or final.stat().st_mtime >= Path(checkpoint).stat().st_mtime):
            run.model.name_or_path, run.model.build = str(final), None
        elif checkpoint is not None:
            run.ckpt_path = checkpoint
        else:
            raise ConfigError(
                f"run_dir={run_dir} has no {FINAL_MODEL}/ and no checkpoints/"
                f"{' or '.join(RESUMABLE_NAMES)}: pass ckpt_path=<one of its checkpoints>"
            )
    OmegaConf.set_struct(run, True)
    return run


def _final_step(run_dir: Path) -> int:
    """The training steps of a finished run (its ``summary.json``); 0 if it has none."""
    summary = run_dir / "summary.json"
    return int(json.loads(summary.read_text())["steps"]) if summary.is_file() else 0


def _progress_bar(eval_sets, limits) -> tuple[Progress, dict[str, int]]:
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    tasks = {
        name: bar.add_task(name, total=len(rows[: limits(name)]))
        for name, rows in eval_sets.items()
        if rows
    }
    return bar, tasks


def evaluate(cfg: DictConfig, overrides: Sequence[str] | None = None) -> EvalResult:
    """Runs the evaluation job; writes ``results.{md,csv,png}`` into ``cfg.paths.output_dir``.

    Args:
        cfg: the composed ``evaluate`` config.
        overrides: with ``cfg.run_dir``, the explicit overrides to lay over the run's config
            (default: this job's command line, see :func:`run_config`).
    """
    if not cfg.get("run_dir") and cfg.get("ckpt_path") and run_folder_of(cfg.ckpt_path):
        cfg = cfg.copy()  # a checkpoint of a train.py run: that run's settings, not evaluate.yaml's
        cfg.run_dir = str(run_folder_of(cfg.ckpt_path))
    settings = "conf/evaluate.yaml"
    if cfg.get("run_dir"):
        cfg = run_config(cfg, overrides)
        settings = f"the run's {Path(cfg.run_dir) / '.hydra' / 'config.yaml'}"
    print(f"settings: {settings}, with this command line's overrides on top", flush=True)
    if cfg.model.get("build") is not None and cfg.model.get("name_or_path"):
        raise ValueError(
            "model.name_or_path and model.build are both set (model=tiny builds the toy base): use "
            "model=pretrained model.name_or_path=<dir or hub id>"
        )
    out_dir = Path(cfg.paths.output_dir)
    os.makedirs(out_dir, exist_ok=True)
    trainer, module, datamodule = build(cfg)
    if trainer.world_size > 1:
        raise ValueError("evaluate.py runs in one process: use trainer=cpu or trainer=gpu")
    if cfg.get("ckpt_path"):
        load_checkpoint_weights(module, cfg.ckpt_path)
    elif cfg.get("run_dir") and cfg.model.name_or_path == str(Path(cfg.run_dir) / FINAL_MODEL):
        module.step_count = _final_step(Path(cfg.run_dir))  # logged at the run's last step
    evaluation = next(
        (c for c in trainer.callbacks if isinstance(c, BenchmarkEvaluation)), None
    ) or instantiate(cfg.callbacks.evaluation)
    # No fit loop runs: attach the trainer by hand so the module's rollout hooks (weight sync)
    # and loggers work as in training.
    module.trainer = trainer
    module.to(trainer.strategy.root_device)
    module.setup("validate")
    datamodule.setup_eval_sets()
    try:
        bar, tasks = _progress_bar(datamodule.eval_sets, evaluation.limit)
        with bar:
            scores = evaluation.evaluate(
                module, datamodule.eval_sets,
                progress=lambda name, done, total: bar.update(tasks[name], completed=done),
            )
    finally:
        module.teardown("validate")
    if not scores:
        raise ValueError("no eval set has any problem: check data.eval_sets and paths.data_dir")
    metrics = metrics_of(scores)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=module.step_count)
        logger.finalize("success")
    sampling = evaluation.sampling
    ks = {s.name: s.k for s in scores}
    header = {
        **({"run": str(cfg.run_dir)} if cfg.get("run_dir") else {}),
        "settings": settings,
        "model": str(cfg.get("ckpt_path") or cfg.model.name_or_path or "model.build (toy base)"),
        "k": str(sampling.n) if set(ks.values()) == {sampling.n}
        else ", ".join(f"{name}={k}" for name, k in ks.items()),
        "sampling": f"temperature={sampling.temperature}, top_p={sampling.top_p}, "
        f"max_new_tokens={sampling.max_new_tokens}",
        "grading": f"{metrics['val/reward_timeouts']} timeouts, "
        f"{metrics['val/reward_failures']} failures (scored 0)",
        "date": datetime.now().isoformat(timespec="seconds"),
    }  # fmt: skip
    files = write_results(scores, out_dir, header)
    print(files["md"].read_text())
    if cfg.model.get("random_weights"):
        print(RANDOM_WEIGHTS_NOTE)
    print(f"results written to {out_dir}")
    return EvalResult(scores, metrics, files)
