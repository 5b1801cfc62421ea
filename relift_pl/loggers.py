"""A CSV logger that a resumed run continues instead of erasing.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder already exists, so a run
resumed into its own folder (``ckpt_path=last``) would keep only the steps after the resume.
Here the file is kept; the rows of the steps the resumed run logs again (those after its
checkpoint) are replaced, so each step appears once, as the run that finished logged it.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ContinuingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        self._resume_checked = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes the file; this one keeps it
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        if not self._resume_checked and step is not None:
            self._resume_checked = True
            self._drop_rows_from(step)
        super().log_metrics(metrics_dict, step)

    def _drop_rows_from(self, step: int) -> None:
        """Drops the kept rows at or after ``step``: the resumed run logs those steps again."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [row for row in rows if row.get("step", "") != "" and int(float(row["step"])) < step]
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
