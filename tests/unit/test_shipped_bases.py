"""Shipped toy bases: found by their settings, verified by sha256, a rebuild compared with them."""

from __future__ import annotations

import json
import shutil

import pytest

from relift_pl.toy import base as toy_base
from relift_pl.toy import shipped
from relift_pl.toy.base import METADATA_FILE, ensure_toy_base

TINY = dict(steps=2, batch_size=4, log_every=0, middle_fraction=0.3,
            model_overrides=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1))


@pytest.fixture
def ship(tmp_path, monkeypatch):
    """A shipped-bases folder of its own holding one tiny base built with TINY."""
    root = tmp_path / "bases"
    monkeypatch.setattr(shipped, "SHIPPED_DIR", root)
    built = ensure_toy_base(tmp_path / "cache", **TINY)
    shutil.copytree(built, root / "tiny")
    shipped.write_sums(root / "tiny")
    return root / "tiny"


def test_the_settings_of_a_shipped_base_load_it_without_training(ship, tmp_path, monkeypatch):
    monkeypatch.setattr(toy_base, "_train_base", lambda *a, **k: pytest.fail("trained"))
    assert ensure_toy_base(tmp_path / "other_cache", **TINY) == ship
    assert not (tmp_path / "other_cache").exists()


def test_other_settings_are_built_and_cached(ship, tmp_path):
    path = ensure_toy_base(tmp_path / "cache2", **{**TINY, "seed": 1})
    assert path.parent == tmp_path / "cache2"


def test_a_setting_the_request_leaves_out_is_no_match(tmp_path, monkeypatch):
    # A shipped base with the digit tasks (task_fraction, digit_tasks in its settings) must not
    # answer a request without them (task_fraction=0 leaves both keys out of the settings).
    root = tmp_path / "bases"
    monkeypatch.setattr(shipped, "SHIPPED_DIR", root)
    with_tasks = ensure_toy_base(tmp_path / "cache", **{**TINY, "task_fraction": 0.5})
    shutil.copytree(with_tasks, root / "tiny2")
    shipped.write_sums(root / "tiny2")
    assert ensure_toy_base(tmp_path / "cache", **{**TINY, "task_fraction": 0.5}) == root / "tiny2"
    plain = ensure_toy_base(tmp_path / "cache", **TINY)
    assert plain.parent == tmp_path / "cache"


def test_a_changed_shipped_file_is_refused_with_its_name(ship, tmp_path):
    weights = ship / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its sha256"):
        ensure_toy_base(tmp_path / "cache3", **TINY)
    (ship / "SHA256SUMS").unlink()
    with pytest.raises(ValueError, match="SHA256SUMS is missing"):
        ensure_toy_base(tmp_path / "cache3", **TINY)


def test_rebuild_trains_and_reports_whether_it_is_the_shipped_one(ship, tmp_path, capsys):
    rebuilt = ensure_toy_base(tmp_path / "cache4", rebuild=True, **TINY)
    assert rebuilt != ship and rebuilt.parent == tmp_path / "cache4"
    assert "is bitwise the shipped one" in capsys.readouterr().out  # same machine, same network
    # A shipped base from "another machine": the same settings, other weights.
    meta = json.loads((ship / METADATA_FILE).read_text())
    other = ensure_toy_base(tmp_path / "cache5", **{**TINY, "seed": 7})
    shutil.rmtree(ship)
    shutil.copytree(other, ship)
    (ship / METADATA_FILE).write_text(json.dumps(meta))
    shipped.write_sums(ship)
    ensure_toy_base(tmp_path / "cache4", rebuild=True, **TINY)
    assert "differs from the shipped one" in capsys.readouterr().out
