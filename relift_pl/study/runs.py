"""Running a study's runs and reading them back.

Every run is a subprocess with one torch thread: ``python train.py experiment=... <overrides>``
(a training run), or one of this module's own tasks on a base (``build_base``, ``score_base``,
``key_tokens``, ``key_token_curve``: ``python -m relift_pl.study.runs <task> <out> <overrides>``). A run's folder holds
what it wrote; a finished run is skipped, and a stopped training run resumes from its last
checkpoint, so a stopped study continues where it was.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from relift_pl.study.stats import LEVELS

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("build_base", "score_base", "key_tokens", "key_token_curve")


@dataclass(frozen=True)
class Base:
    """A toy base a study runs on: the Hydra overrides that select it, and the environment its
    runs need (``ATEN_CPU_CAPABILITY=avx2``: PyTorch's own kernels at AVX2 rather than AVX-512;
    matrix products keep their BLAS / oneDNN kernels)."""

    overrides: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class Job:
    """One run: where it writes, what it runs (``task``: ``train`` or one of ``TASKS``)."""

    out: Path
    experiment: str
    overrides: list[str]
    base: Base = Base()
    split: str = "test"
    seed: int = 0
    steps: int = 150
    task: str = "train"
    extra: list[str] = field(default_factory=list)
    """Overrides for every run of the study (the command line's ``--overrides``)."""

    def expanded(self) -> list[str]:
        """The overrides, ``{steps}`` / ``{half}`` filled in, the base's first."""
        own = [o.format(steps=self.steps, half=self.steps // 2) for o in self.overrides]
        return [*self.base.overrides, *own, *self.extra]

    def max_steps(self) -> int:
        """The run's max_steps (an override may set it)."""
        for o in reversed(self.expanded()):
            if o.startswith("max_steps="):
                return int(o.split("=")[1])
        return self.steps

    def command(self) -> list[str]:
        if self.task != "train":
            return [sys.executable, "-m", "relift_pl.study.runs", self.task, str(self.out),
                    f"experiment={self.experiment}", *self.expanded()]
        sets = [f"data.eval_sets.{lvl}.split={self.split}" for lvl in LEVELS] if self.split != "test" else []
        return [sys.executable, str(ROOT / "train.py"), f"experiment={self.experiment}", *self.expanded(),
                *sets, f"seed={self.seed}", f"hydra.run.dir={self.out}", "logger=csv",
                "callbacks.progress_bar=null"]

    def finished(self) -> bool:
        if self.task != "train":
            return (self.out / "done").exists()
        summary = self.out / "summary.json"
        return summary.exists() and json.loads(summary.read_text())["steps"] >= self.max_steps()


def launch(job: Job) -> tuple[Job, float, int]:
    """Runs one job to its end (skipped when finished; a stopped training run resumes)."""
    if job.finished():
        return job, 0.0, 0
    job.out.mkdir(parents=True, exist_ok=True)
    cmd = job.command()
    if job.task == "train" and any((job.out / "checkpoints").glob("*.ckpt")):
        cmd.append("ckpt_path=last")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **dict(job.base.env)}
    started = time.time()
    with open(job.out / "stdout.log", "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    return job, time.time() - started, rc


def run_all(jobs: list[Job], parallel: int) -> None:
    """Runs ``jobs``, ``parallel`` at a time, with a progress bar; exits naming failed runs."""
    from rich.progress import Progress

    failed = []
    with Progress() as progress, ThreadPoolExecutor(parallel) as pool:
        task = progress.add_task(f"{len(jobs)} runs", total=len(jobs))
        for job, seconds, rc in pool.map(launch, jobs):
            progress.advance(task)
            if rc:
                failed.append(f"{job.out} (exit {rc}; see {job.out / 'stdout.log'})")
            progress.console.print(f"{job.out}: " + (f"{seconds / 60:.1f} min" if seconds else "done before")
                                   + (f" FAILED exit {rc}" if rc else ""))
    if failed:
        sys.exit("failed runs: " + "; ".join(failed))


def load_run(path: Path) -> dict:
    """{"summary", "evals": {step: {set: {"correct": {id: share}, "tokens": {id: mean}}}},
    "metrics": {step: {key: value}}} of one run folder (a base-scoring folder has evals only)."""
    evals: dict[int, dict] = defaultdict(dict)
    for line in (path / "eval" / "per_problem.jsonl").read_text().splitlines():
        rec = json.loads(line)
        evals[rec["step"]][rec["set"]] = rec
    metrics: dict[int, dict[str, float]] = defaultdict(dict)
    csv_path = path / "csv" / "metrics.csv"
    if csv_path.exists():
        with open(csv_path) as f:
            for row in csv.DictReader(f):
                step = int(float(row["step"]))
                metrics[step].update({k: float(v) for k, v in row.items() if v != "" and k != "step"})
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    logged = {step for step, m in metrics.items() if "perf/trained_tokens" in m}
    missing = sorted(set(range(1, summary.get("steps", 0) + 1)) - logged)
    if summary and missing:  # the sums over steps would silently undercount
        raise SystemExit(f"{csv_path}: no step metrics for steps {missing[0]}..{missing[-1]} "
                         f"({len(missing)} of {summary['steps']}); delete {path} and run the script again")
    return {"summary": summary, "evals": dict(evals), "metrics": dict(metrics)}


def run_config(path: Path) -> dict:
    """The run's composed config (Hydra's .hydra/config.yaml), as plain data."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"), resolve=False)


# -- the tasks on a base (subprocesses: each gets the base's environment) --------------------------
def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import relift_pl.train  # noqa: F401  (registers the config's relift_root resolver)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["num_threads=1", "logger=csv", *overrides])


def build_base(out: Path, overrides: list[str]) -> None:
    """Builds (or finds) the base once, before parallel runs would race to build it."""
    from hydra.utils import instantiate

    path = instantiate(_compose(overrides).model.build)()
    (out / "base.txt").write_text(f"{path}\n")


def step0_scores(cfg) -> list:
    """The run ``cfg`` describes, evaluated before any step (its callback's SetScores)."""
    from callbacks.evaluation import BenchmarkEvaluation
    from relift_pl.train import build

    trainer, module, datamodule = build(cfg)
    evaluation = next(c for c in trainer.callbacks if isinstance(c, BenchmarkEvaluation))
    module.trainer = trainer
    module.setup("validate")
    datamodule.setup_eval_sets()
    try:
        return evaluation.evaluate(module, datamodule.eval_sets)
    finally:
        module.teardown("validate")


def score_base(out: Path, overrides: list[str]) -> None:
    """Evaluates the untrained base as a run's step-0 evaluation does (``BenchmarkEvaluation``);
    writes ``eval/per_problem.jsonl`` (step 0) into ``out``."""
    scores = step0_scores(_compose([f"paths.output_dir={out}", *overrides]))
    (out / "eval").mkdir(parents=True, exist_ok=True)
    with open(out / "eval" / "per_problem.jsonl", "w") as f:
        for score in scores:
            f.write(json.dumps({"step": 0, "set": score.name, "k": score.k, "correct": score.per_problem,
                                "tokens": score.response_tokens}) + "\n")


def key_tokens(out: Path, overrides: list[str]) -> None:
    """The base's probabilities of the level-4 validation demonstrations' least likely tokens
    (:func:`relift_pl.study.key_tokens.demo_token_probs`), into ``key_tokens.json``."""
    from hydra.utils import instantiate

    from relift_pl.models import load_policy, load_tokenizer, resolve_model_path
    from relift_pl.study.key_tokens import demo_token_probs, summary
    from relift_pl.toy import world2

    cfg = _compose(overrides)
    path = resolve_model_path(cfg.model.name_or_path, instantiate(cfg.model.get("build")))
    rows = world2.level_pool("val", 4)
    probs = demo_token_probs(load_policy(path).eval(), load_tokenizer(path), rows)
    (out / "key_tokens.json").write_text(json.dumps({"base": str(path), **summary(probs)}, indent=1))


def key_token_curve(out: Path, overrides: list[str]) -> None:
    """:func:`key_tokens` at each ``step-*.ckpt`` of the training run ``out`` sits in (``out``:
    ``<run>/key_tokens``), into ``key_tokens_by_step.json``."""
    from hydra.utils import instantiate

    from relift_pl.models import load_policy, load_tokenizer, resolve_model_path
    from relift_pl.study.key_tokens import checkpoint_curve
    from relift_pl.toy import world2

    cfg = _compose(overrides)
    path = resolve_model_path(cfg.model.name_or_path, instantiate(cfg.model.get("build")))
    checkpoints = list((out.parent / "checkpoints").glob("step-*.ckpt"))
    curve = checkpoint_curve(load_policy(path), load_tokenizer(path), checkpoints, world2.level_pool("val", 4))
    (out / "key_tokens_by_step.json").write_text(json.dumps(curve, indent=1))


if __name__ == "__main__":
    task, folder, *rest = sys.argv[1:]
    if task not in TASKS:
        sys.exit(f"unknown task {task!r}; one of {TASKS}")
    globals()[task](Path(folder), rest)
    (Path(folder) / "done").write_text("ok\n")
