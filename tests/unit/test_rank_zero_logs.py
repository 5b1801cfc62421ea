"""Messages every rank would repeat word for word (each loads the same rows) come from rank 0."""

from __future__ import annotations

import logging

import pytest
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from relift_pl.data import datamodule, row_checks, sources, templates


@pytest.mark.parametrize("module", [datamodule, sources, row_checks, templates])
def test_data_messages_come_from_rank_0_only(module, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    module.log.warning("eval set x: 1 problems dropped")
    assert not caplog.records
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    module.log.warning("eval set x: 1 problems dropped")
    assert [r.getMessage() for r in caplog.records] == ["eval set x: 1 problems dropped"]
