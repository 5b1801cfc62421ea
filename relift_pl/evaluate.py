"""``evaluate(cfg)``: scores a model directory or a training checkpoint on the benchmark suite.

It builds the policy, rollout engine, reward and eval sets exactly as training does
(:func:`relift_pl.train.build`) and scores them with the training run's own
:class:`callbacks.BenchmarkEvaluation`, so a number here and one logged during training mean the
same thing. It runs in one process (one CPU or one GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from callbacks.evaluation import BenchmarkEvaluation, SetScore, metrics_of
from relift_pl.checkpoint import check_checkpoint_file
from relift_pl.module import ReLIFTModule
from relift_pl.results import write_results
from relift_pl.train import build


@dataclass
class EvalResult:
    scores: list[SetScore]
    metrics: dict[str, float]
    """The logged values: ``val/<set>/avg@k``, ``val/<set>/pass@k``, ``val/avg``."""
    files: dict[str, Path]
    """``md``, ``csv``, ``png`` -> path."""


def load_checkpoint_weights(module: ReLIFTModule, ckpt_path: str) -> None:
    """Loads a train.py checkpoint's weights (and counters) into ``module``.

    Raises:
        ValueError: a sharded (directory) checkpoint, or weights that do not fit the model.
    """
    path = check_checkpoint_file(ckpt_path)
    if path.is_dir():
        raise ValueError(
            f"ckpt_path={ckpt_path} is a sharded (FSDP) checkpoint folder; evaluate.py reads "
            "single-file checkpoints. Consolidate it first (torch.distributed.checkpoint."
            "format_utils.dcp_to_torch_save) or evaluate an exported model directory."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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


def evaluate(cfg: DictConfig) -> EvalResult:
    """Runs the evaluation job; writes ``results.{md,csv,png}`` into ``cfg.paths.output_dir``."""
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
    header = {
        "model": str(cfg.get("ckpt_path") or cfg.model.name_or_path or "model.build (toy base)"),
        "sampling": f"k={sampling.n}, temperature={sampling.temperature}, top_p={sampling.top_p}, "
        f"max_new_tokens={sampling.max_new_tokens}",
        "date": datetime.now().isoformat(timespec="seconds"),
    }
    files = write_results(scores, out_dir, header)
    print(files["md"].read_text())
    print(f"results written to {out_dir}")
    return EvalResult(scores, metrics, files)
