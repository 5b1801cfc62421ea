"""A run stopped by a config error leaves no run folder behind; a folder holding more (a resumed
run's checkpoints) is left as it was."""

from __future__ import annotations

import logging

from relift_pl.cli import remove_unstarted_run_folder


def _hydra_folder(root, with_log_handler: bool = True):
    folder = root / "outputs" / "2026-01-01" / "12-00-00"
    (folder / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (folder / ".hydra" / name).write_text("{}\n")
    handler = logging.FileHandler(folder / "train.log")  # what Hydra's job logging opens
    if with_log_handler:
        logging.getLogger().addHandler(handler)
    return folder, handler


def test_a_folder_with_only_hydras_files_goes_with_its_emptied_date_folder(tmp_path):
    folder, handler = _hydra_folder(tmp_path)
    try:
        assert remove_unstarted_run_folder(folder)
    finally:
        logging.getLogger().removeHandler(handler)
    assert not folder.exists() and not folder.parent.exists()
    assert (tmp_path / "outputs").is_dir()  # never above the date
    assert handler not in logging.getLogger().handlers


def test_a_folder_holding_a_run_stays(tmp_path):
    folder, handler = _hydra_folder(tmp_path)
    (folder / "checkpoints").mkdir()  # hydra.run.dir=<a run> ckpt_path=last with a bad value
    try:
        assert not remove_unstarted_run_folder(folder)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert sorted(p.name for p in folder.iterdir()) == [".hydra", "checkpoints", "train.log"]


def test_another_ranks_log_keeps_the_folder_until_that_rank_removes_it(tmp_path):
    folder, handler = _hydra_folder(tmp_path)
    (folder / "train_rank1.log").write_text("")
    try:
        assert not remove_unstarted_run_folder(folder)  # rank 0: its log and .hydra/ go
    finally:
        logging.getLogger().removeHandler(handler)
    assert [p.name for p in folder.iterdir()] == ["train_rank1.log"]
    (folder / "train_rank1.log").unlink()  # rank 1's turn
    assert remove_unstarted_run_folder(folder) and not folder.parent.exists()
