"""What train.py and evaluate.py share around their job: key checks, one-line config errors,
rank-0 messages."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from relift_pl.config import ConfigError
from relift_pl.validation import unknown_key_message

CONF = Path(__file__).resolve().parents[1] / "conf"


def say(message: str) -> None:
    """Prints on rank 0 only (every rank runs the script), flushed for log files."""
    if rank_zero_only.rank == 0:
        print(message, flush=True)


@contextmanager
def config_errors() -> Iterator[None]:
    """A ConfigError ends the run with its one line on stderr and status 1, no traceback
    (``HYDRA_FULL_ERROR=1`` shows it)."""
    try:
        yield
    except ConfigError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def declared_top_level_keys(config_name: str, conf_dir: Path = CONF) -> set[str]:
    """The keys a primary config (and the primary configs in its defaults) declares, plus its
    config groups (``trainer``, ``model``, ...)."""
    conf = OmegaConf.load(conf_dir / f"{config_name}.yaml")
    keys = {str(key) for key in conf if key != "defaults"}
    for entry in conf.get("defaults", []):
        if isinstance(entry, str):  # another primary config (evaluate.yaml builds on train)
            if entry != "_self_":
                keys |= declared_top_level_keys(entry, conf_dir)
            continue
        group = str(next(iter(entry))).removeprefix("override ").lstrip("/")
        keys.add(group.split("@", 1)[0].split("/", 1)[0])
    return keys


def check_top_level_keys(cfg: DictConfig, config_name: str, conf_dir: Path = CONF) -> None:
    """Refuses a top-level key the config does not declare (``+max_step=5`` for max_steps):
    Hydra's own hint (``use +``) would otherwise make a typo run with the default."""
    known = declared_top_level_keys(config_name, conf_dir)
    for key in cfg:
        if key not in known:
            raise ConfigError(
                unknown_key_message(str(key), known, f"a top-level key of conf/{config_name}.yaml")
            )
