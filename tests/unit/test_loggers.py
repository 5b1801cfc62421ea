"""metrics.csv across runs in one folder: a resume keeps the rows up to its checkpoint's step and
replaces the later ones; a fresh run starts a fresh file; a checkpoint save writes the rows."""

from __future__ import annotations

import csv

from relift_pl.loggers import ContinuingCSVLogger


def _rows(path) -> list[tuple[int, str]]:
    with open(path, newline="") as f:
        return [(int(float(r["step"])), r["loss"]) for r in csv.DictReader(f)]


def _logger(tmp_path, resumed_step: int | None) -> ContinuingCSVLogger:
    logger = ContinuingCSVLogger(save_dir=tmp_path, name="csv", version="")
    logger.start(resumed_step)  # what LogContinuation does at train start
    return logger


def _log(logger: ContinuingCSVLogger, steps, tag: str) -> None:
    for step in steps:
        logger.log_metrics({"loss": f"{tag}{step}"}, step=step)
    logger.save()


def test_a_resume_keeps_the_steps_up_to_its_checkpoint_and_replaces_the_rest(tmp_path):
    _log(_logger(tmp_path, None), [0, 1, 2, 3, 4, 5], "a")  # checkpointed at step 3, stopped after 5
    resumed = _logger(tmp_path, 3)
    _log(resumed, [3, 4, 5, 6], "b")  # the final evaluation of step 3, then steps 4-6
    assert _rows(tmp_path / "csv" / "metrics.csv") == [
        (0, "a0"), (1, "a1"), (2, "a2"), (3, "a3"), (3, "b3"), (4, "b4"), (5, "b5"), (6, "b6")]


def test_a_resume_with_new_keys_keeps_the_old_rows(tmp_path):
    _log(_logger(tmp_path, None), [1, 2], "a")
    resumed = _logger(tmp_path, 2)
    resumed.log_metrics({"loss": "b3", "val/avg": 0.5}, step=3)
    resumed.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"], r["val/avg"]) for r in rows] == [
        ("1", "a1", ""), ("2", "a2", ""), ("3", "b3", "0.5")]


def test_a_fresh_run_in_a_used_folder_starts_a_fresh_file(tmp_path):
    _log(_logger(tmp_path, None), [0, 1, 2], "a")
    _log(_logger(tmp_path, None), [1, 2], "b")
    assert _rows(tmp_path / "csv" / "metrics.csv") == [(1, "b1"), (2, "b2")]


def test_a_checkpoint_save_writes_the_logged_rows_first(tmp_path):
    from types import SimpleNamespace

    from relift_pl.loggers import flush_loggers

    logger = _logger(tmp_path, None)
    logger.log_metrics({"loss": "a1"}, step=1)  # Lightning itself writes every 100 steps
    assert not (tmp_path / "csv" / "metrics.csv").exists()
    flush_loggers(SimpleNamespace(loggers=[logger]))  # what every checkpoint save calls first
    assert _rows(tmp_path / "csv" / "metrics.csv") == [(1, "a1")]
