"""metrics.csv survives a resume into the same folder; steps logged again replace their rows."""

from __future__ import annotations

import csv

from relift_pl.loggers import ContinuingCSVLogger


def _rows(path) -> list[tuple[int, str]]:
    with open(path, newline="") as f:
        return [(int(float(r["step"])), r["loss"]) for r in csv.DictReader(f)]


def _log(logger: ContinuingCSVLogger, steps, tag: str) -> None:
    for step in steps:
        logger.log_metrics({"loss": f"{tag}{step}"}, step=step)
    logger.save()


def test_a_resumed_logger_keeps_earlier_steps_and_replaces_the_repeated_ones(tmp_path):
    first = ContinuingCSVLogger(save_dir=tmp_path, name="csv", version="")
    _log(first, [1, 2, 3, 4, 5], "a")  # a run checkpointed at step 3, stopped after step 5
    resumed = ContinuingCSVLogger(save_dir=tmp_path, name="csv", version="")
    _log(resumed, [4, 5, 6], "b")  # the resume repeats steps 4-5
    assert _rows(tmp_path / "csv" / "metrics.csv") == [
        (1, "a1"), (2, "a2"), (3, "a3"), (4, "b4"), (5, "b5"), (6, "b6")]


def test_a_resumed_logger_with_new_keys_keeps_the_old_rows(tmp_path):
    first = ContinuingCSVLogger(save_dir=tmp_path, name="csv", version="")
    _log(first, [1, 2], "a")
    resumed = ContinuingCSVLogger(save_dir=tmp_path, name="csv", version="")
    resumed.log_metrics({"loss": "b3", "val/avg": 0.5}, step=3)
    resumed.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"], r["val/avg"]) for r in rows] == [
        ("1", "a1", ""), ("2", "a2", ""), ("3", "b3", "0.5")]
