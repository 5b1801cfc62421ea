"""What train.py and evaluate.py share around their job: key checks, one-line config errors,
rank-0 messages, and no run folder left behind by a run that never started."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, InterpolationResolutionError

from relift_pl.config import ConfigError
from relift_pl.validation import unknown_key_message

CONF = Path(__file__).resolve().parents[1] / "conf"
# What Hydra writes into a run folder before the job's code runs: nothing else means no run.
_BOOKKEEPING = re.compile(r"^(\.hydra|.+\.log)$")
_DATE_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")  # outputs/<date>/<time>


def say(message: str) -> None:
    """Prints on rank 0 only (every rank runs the script), flushed for log files."""
    if rank_zero_only.rank == 0:
        print(message, flush=True)


@contextmanager
def config_errors(run_folder: str | None = None) -> Iterator[None]:
    """A ConfigError ends the run with its one line on stderr and status 1, no traceback
    (``HYDRA_FULL_ERROR=1`` shows it). ``run_folder``: the job's folder, removed then if it holds
    nothing but what Hydra wrote before the job started (a run that never started)."""
    try:
        yield
    except (ConfigError, InterpolationResolutionError) as raised:
        err = _config_error_in(raised)
        if err is None:
            raise
        if run_folder:
            remove_unstarted_run_folder(Path(run_folder))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _config_error_in(err: BaseException) -> ConfigError | None:
    """``err`` if a ConfigError, else the ConfigError a config resolver raised under it (OmegaConf
    wraps it in InterpolationResolutionErrors), else None."""
    for _ in range(16):
        if err is None or isinstance(err, ConfigError):
            return err
        err = err.__cause__ or err.__context__
    return None


def remove_unstarted_run_folder(folder: Path) -> bool:
    """Removes ``folder`` (and an emptied ``<date>`` folder above it) when it holds only Hydra's
    ``.hydra/`` and log files: this process's log and, on rank 0, ``.hydra/``; another rank's log
    keeps the folder until that rank removes its own. A folder with anything else in it (a
    resumed run's checkpoints) stays as it is. Returns whether the folder is gone."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    if not all(_BOOKKEEPING.match(entry.name) for entry in entries):
        return False
    root = logging.getLogger()
    for handler in list(root.handlers):  # this process's log file (Hydra's job logging)
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            handler.close()
            root.removeHandler(handler)
            Path(handler.baseFilename).unlink(missing_ok=True)
    if rank_zero_only.rank == 0:
        shutil.rmtree(folder / ".hydra", ignore_errors=True)
    try:
        folder.rmdir()
    except OSError:
        return False
    if _DATE_FOLDER.match(folder.parent.name):
        with suppress(OSError):  # other runs of that day
            folder.parent.rmdir()
    return True


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
            raise ConfigError(_top_level_message(str(key), known, config_name))


def _top_level_message(key: str, known, config_name: str) -> str:
    return unknown_key_message(key, known, f"a top-level key of conf/{config_name}.yaml")


def compose_config(config_name: str, overrides: Sequence[str], conf_dir: Path = CONF) -> DictConfig:
    """The config Hydra composes for these command-line overrides (in this process, nothing
    resolved or built: about 0.1 s)."""
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def unknown_override_message(
    overrides: Sequence[str], config_name: str, conf_dir: Path = CONF
) -> str | None:
    """The one-line error for an override of a key the config lacks (``max_step=5``,
    ``algorithm.group_sise=4``), with the close matches; None when the overrides compose (other
    composition errors are Hydra's to report). Hydra's own message ("To append to your config
    use +max_step=5") invites the wrong fix."""
    try:
        compose_config(config_name, overrides, conf_dir)
        return None
    except ConfigCompositionException as err:
        cause = err.__cause__
        if not isinstance(cause, ConfigAttributeError | ConfigKeyError) or "not in struct" not in str(cause):
            return None
        missing = str(cause.full_key)
    parent, _, _ = missing.rpartition(".")
    if not parent:
        return _top_level_message(missing, declared_top_level_keys(config_name, conf_dir), config_name)
    others = [o for o in overrides if not _sets(o, missing)]
    try:
        node = OmegaConf.select(compose_config(config_name, others, conf_dir), parent)
    except ConfigCompositionException:
        return None
    known = [str(k) for k in node if not str(k).startswith("_")] if isinstance(node, DictConfig) else []
    return unknown_key_message(missing, known, f"a key of {parent}")


def _sets(override: str, key: str) -> bool:
    """Whether ``override`` sets ``key`` or a key under it."""
    name = override.split("=", 1)[0].lstrip("+~")
    return name == key or name.startswith(key + ".")


def exit_on_unknown_override(argv: Sequence[str], config_name: str) -> None:
    """Before Hydra starts (train.py, evaluate.py): an override of a key the config lacks ends
    the job with one line naming it and the close matches, as ``+max_step=5`` does."""
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    if not overrides or multirun or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    message = unknown_override_message(overrides, config_name)
    if message:
        print(f"Error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1)
