"""Shared fixtures: compose the real Hydra config the way train.py does, forced onto the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import relift_pl.train  # noqa: F401  (registers the relift_root resolver)

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

# Two cores are shared by everything here; one torch thread per process avoids oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose_cfg(overrides: list[str] | None = None, output_dir: Path | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        extra = [f"paths.output_dir={output_dir}"] if output_dir else ["paths.output_dir=/tmp/relift-unused"]
        return compose(config_name="train", overrides=[*extra, *(overrides or [])])


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str):
        return compose_cfg(list(overrides), output_dir=tmp_path / "run")

    return _make
