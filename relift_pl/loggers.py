"""A CSV logger that a resumed run continues instead of erasing.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder already exists, so a run
resumed into its own folder (``ckpt_path=...``) would keep only the steps after the resume; and it
writes the file every 100 steps, so a killed run loses up to 100 steps its checkpoint holds.
Here, at fit start (``LogContinuation``, added by ``train.build`` beside this logger):

- a resumed run keeps the rows up to the step it resumes from and drops the later ones (they
  are logged again), so each step appears once, as the run that got there logged it;
- a fresh run in a used folder starts a fresh file, as Lightning's does;

and the rows are written before every checkpoint is (:func:`flush_loggers`), so a checkpoint
never holds steps the file lacks.

It reads the resumed step at train start: ``ModelParallelStrategy`` (FSDP2) restores the
checkpoint after ``on_fit_start``, where the module still counts 0.
"""

from __future__ import annotations

import csv
import logging

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class _ContinuingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning's deletes the file here; see start()
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])

    def start(self, resumed_step: int | None) -> None:
        """Keeps the rows at steps <= ``resumed_step`` (none for a fresh run)."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        if resumed_step is None:
            log.warning("%s: an earlier run's metrics, replaced by this run's", self.metrics_file_path)
            self._fs.rm_file(self.metrics_file_path)
            self.metrics_keys = []  # save() records the keys of what this run logs
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [row for row in rows if int(float(row["step"])) <= resumed_step]
        if len(kept) < len(rows):
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume into the same folder."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def start(self, resumed_step: int | None) -> None:
        self.experiment.start(resumed_step)


def flush_loggers(trainer: L.Trainer) -> None:
    """Writes what every logger holds. Called before each checkpoint save (periodic, top-k and
    ``preempted.ckpt``): a kill right after a save then finds the file with every step the
    checkpoint holds (rows of later steps are dropped on resume)."""
    for logger in trainer.loggers:
        logger.save()


class LogContinuation(L.Callback):
    """Tells each ``ContinuingCSVLogger`` at train start whether, and from which step, the run
    resumed (every strategy has restored the module's ``step_count`` by then). It must come
    before any callback that logs in ``on_train_start`` (the before-training evaluation)."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        resumed = module.step_count if trainer.ckpt_path else None
        for logger in trainer.loggers:
            if isinstance(logger, ContinuingCSVLogger):
                logger.start(resumed)
