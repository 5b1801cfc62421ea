"""Checkpoint files: atomic writes, a ModelCheckpoint that counts training steps, resume lookup."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from relift_pl.config import ConfigError
from relift_pl.loggers import flush_loggers
from relift_pl.untrusted import (
    UnsafeFileError,
    check_distributed_checkpoint_metadata,
    check_distributed_checkpoint_values,
    intact_archive,
    load_weights_only,
    shown,
)

RESUMABLE_NAMES = ("preempted.ckpt", "last.ckpt")
log = logging.getLogger(__name__)


def named_abspath(path: str | os.PathLike) -> str:
    """``path`` made absolute as named, symlinks kept: against the working directory as the
    shell named it ($PWD, when that is this directory) rather than its physical path. Nodes
    that reach one shared folder through different symlinks or mount points then name it
    alike, and every rank can use the name rank 0 chose (a resolved path may exist on rank 0's
    node only)."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isabs(path):
        return os.path.normpath(path)
    cwd = os.environ.get("PWD")
    try:
        if not cwd or not os.path.isabs(cwd) or not os.path.samefile(cwd, "."):
            cwd = os.getcwd()
    except OSError:
        cwd = os.getcwd()
    return os.path.normpath(os.path.join(cwd, path))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<file>.tmp`` then renames it over ``<file>``: a kill mid-write never leaves a
    half-written checkpoint under the real name, and the previous one stays intact.

    Lightning's own writer serialises to memory first but then writes the final path in place,
    so a kill during that write truncates the file; hence this plugin.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        _remove_stale_tmp(path)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable (a crash of the machine right after it keeps the new file).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_tmp(path: Path) -> None:
    """Deletes ``<name>.tmp<pid>`` files left by writers that were killed mid-write."""
    for stale in path.parent.glob(f"{glob.escape(path.name)}.tmp*"):
        pid = stale.name[len(path.name) + 4 :]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrainingStepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that counts training steps (``module.step_count``) and follows evaluation.

    - ``last.ckpt`` is written every ``every_n_train_steps`` training steps and after the final
      one, so it always holds what the run ended with (Lightning counts ``global_step``, which
      advances by one or two per training step here: RL and SFT optimizer steps).
    - With ``monitor`` on an evaluation metric (``val/...``), a top-k checkpoint is considered
      at every step that evaluated (the evaluation callback runs first in the same hook), never
      at a step whose ``val/...`` values are left over from an older evaluation; otherwise top-k
      saves follow the period like ``last``.
    - ``export_hf``: the final policy is also written as a Hugging Face model directory
      ``<export_dir>/final_model`` and, when a monitored checkpoint becomes the best,
      ``<export_dir>/best_model``.
    - Checkpoint names count training steps too (``{step}`` is ``module.step_count``).
    - Nothing is saved at epoch ends. A preempted step is saved once, as ``preempted.ckpt``,
      before its saves; the run that resumes it does them first (``on_train_start``, after the
      evaluation callback has redone the step's evaluation), the final step's export included,
      while a finished run resumed for nothing rewrites nothing.
    - ``save_last=link`` is refused: a later top-k save deletes the file the link points to.

    Args:
        export_hf: write ``final_model`` / ``best_model`` directories.
        export_dir: where they go (the run directory).
        export_dtype: ``auto`` (the source checkpoint's dtype) or a torch dtype name.
        **kwargs: ModelCheckpoint's arguments.
    """

    def __init__(self, *args: Any, export_hf: bool = False, export_dir: str | None = None,
                 export_dtype: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dirpath = kwargs.get("dirpath", args[0] if args else None)
        if dirpath is not None and self.dirpath == os.path.realpath(os.path.expanduser(dirpath)):
            # Lightning resolves symlinks here, then every rank writes into rank 0's resolved
            # path, which another node may reach only through its own symlink or mount point.
            self.dirpath = named_abspath(dirpath)
        if export_hf and not export_dir:
            raise ValueError("callbacks.checkpoint.export_dir must be set when export_hf is true")
        if self.save_last == "link":
            raise ValueError(
                "callbacks.checkpoint.save_last=link is not supported: a later top-k save deletes "
                "the checkpoint last.ckpt links to; use save_last=true"
            )
        self.export_hf = export_hf
        self.export_dir = Path(export_dir) if export_dir else None
        self.export_dtype = export_dtype
        self._last_step_saved = -1
        # The step whose saves were done when the checkpoint this run resumed from was written.
        self._resumed_saved_step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        step = pl_module.step_count
        if pl_module.preempted or step == self._last_step_saved or trainer.sanity_checking:
            return  # (Lightning's own skip test compares global_step, which a skipped step keeps)
        self._save(trainer, pl_module, final=step >= pl_module.max_steps)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        # Resumed from a checkpoint written before its step's saves (preempted.ckpt): do them now.
        step = pl_module.step_count
        if pl_module.preempted or step == 0 or self._resumed_saved_step in (None, step):
            return
        self._save(trainer, pl_module, final=step >= pl_module.max_steps)

    def _save(self, trainer, pl_module, final: bool) -> None:
        step = pl_module.step_count
        n = self._every_n_train_steps
        periodic = n >= 1 and step % n == 0
        candidates = self._monitor_candidates(trainer)
        best_before = self.best_model_path
        self._last_step_saved = step  # before the saves: the files written here record it
        if self._evaluated_at(trainer, step) if self._follows_evaluation else periodic:
            self._save_topk_checkpoint(trainer, candidates)
        if periodic or final:
            self._save_last_checkpoint(trainer, candidates)
        if not self.export_hf:
            return
        if self.monitor is not None and self.best_model_path != best_before:
            self._export(trainer, pl_module, "best_model")
        if final:
            self._export(trainer, pl_module, "final_model")

    def _monitor_candidates(self, trainer) -> dict[str, torch.Tensor]:
        # "{step}" in file names: the training step (Lightning's is global_step, which counts RL
        # and SFT optimizer steps and is all a resume that takes no step would have).
        candidates = super()._monitor_candidates(trainer)
        candidates["step"] = torch.tensor(trainer.lightning_module.step_count)
        return candidates

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        flush_loggers(trainer)  # first: the logged rows are on disk before the checkpoint is
        super()._save_checkpoint(trainer, filepath)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        # A run resumed into a new folder ranks its checkpoints against the earlier folder's best
        # (load_state_dict): a better one replaces it as best, but that folder is not ours to prune.
        if Path(filepath).parent == Path(self.dirpath):
            super()._remove_checkpoint(trainer, filepath)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_step_saved": self._last_step_saved}

    @property
    def state_key(self) -> str:
        # Lightning's key also holds every_n_train_steps: a resume with another period would
        # restore nothing (the best so far, the step's saves) without a word. The ranking only.
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        ours = [k for k in states if isinstance(k, str) and k.startswith(f"{type(self).__qualname__}{{")]
        if self.state_key not in states:  # checkpoints whose key held the period
            same_ranking = [k for k in ours if k.startswith(self.state_key[:-1] + ",")]
            if same_ranking:
                states[self.state_key] = states[same_ranking[0]]
        # Which step's saves were done does not depend on the ranking: a resume that changed
        # monitor or mode (and so starts its ranking afresh) still finishes a preempted step's.
        if ours:
            self._resumed_saved_step = states[ours[0]].get("last_step_saved")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        with warnings.catch_warnings():  # Lightning's "dirpath has changed": handled here
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)
        if moved and state_dict.get("monitor") == self.monitor:
            # Resumed into a new folder: the best so far (in the earlier folder) still ranks
            # this run's checkpoints, as in the run that did not stop.
            self.best_model_score = state_dict["best_model_score"]
            self.best_k_models = dict(state_dict.get("best_k_models") or {})
            self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
            self.kth_value = state_dict.get("kth_value", self.kth_value)

    @property
    def _follows_evaluation(self) -> bool:
        return self.monitor is not None and self.monitor.startswith("val/")

    @staticmethod
    def _evaluated_at(trainer, step: int) -> bool:
        """Whether ``val/...`` metrics in ``callback_metrics`` come from an evaluation at ``step``."""
        from callbacks.evaluation import BenchmarkEvaluation

        return any(
            getattr(c, "last_eval_step", -1) == step
            for c in trainer.callbacks if isinstance(c, BenchmarkEvaluation)
        )  # fmt: skip

    def _export(self, trainer, pl_module, name: str) -> None:
        from relift_pl.export import export_hf

        template = getattr(trainer.datamodule, "template", None)
        export_hf(pl_module.policy, pl_module.tokenizer, self.export_dir / name, template, self.export_dtype)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_validation_end(self, trainer, pl_module) -> None:
        pass

    def on_train_end(self, trainer, pl_module) -> None:
        # A run resumed at its final step from a checkpoint that does not say whether that step's
        # saves were done (older checkpoints; or killed during the export): done now unless the
        # files show them done. A finished run resumed again finds them done.
        step = pl_module.step_count
        if pl_module.preempted or step < pl_module.max_steps or step == self._last_step_saved:
            return
        if self._final_saves_done(trainer):
            return
        self._save(trainer, pl_module, final=True)

    def _final_saves_done(self, trainer) -> bool:
        """Whether the final policy's export (or, without one, last.ckpt) is newer than every
        checkpoint of the run: then the final step's saves already happened."""
        folder = Path(self.dirpath)
        newest = max((p.stat().st_mtime for p in folder.glob("*.ckpt")), default=0.0) if folder.exists() else 0.0
        if self.export_hf:
            final = self.export_dir / "final_model"
            return final.exists() and final.stat().st_mtime >= newest
        last = folder / "last.ckpt"
        return last.exists() and last.stat().st_mtime >= newest


def check_checkpoint_file(path: str | Path) -> Path:
    """Fails with a clear message if ``path`` is missing, truncated or corrupted (CRC check)."""
    path = Path(path)
    if path.is_dir():  # a distributed (FSDP2) checkpoint folder
        return _check_checkpoint_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (ckpt_path)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"checkpoint {path} is truncated or corrupted ({err}); {_RESUME_EARLIER}") from err
    if bad is not None:
        raise ValueError(f"checkpoint {path} is corrupted (bad member {bad}); {_RESUME_EARLIER}")
    return path


_RESUME_EARLIER = "resume from an earlier one with ckpt_path=<path> (see the checkpoints/ folder)"


def _check_checkpoint_folder(path: Path) -> Path:
    """A sharded checkpoint is complete when its DCP metadata (written last, after every shard)
    and Lightning's ``meta.pt`` (counters, callbacks; written by rank 0) are both readable, and
    every shard file the metadata names is there, as long as it says, and safe when neither
    pickles anything that could run code (:mod:`relift_pl.untrusted`). (Checking the shards'
    checksums would mean reading the whole checkpoint on every rank: done only after a failed
    load, :func:`unreadable_checkpoint`.)"""
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint import FileSystemReader

    try:
        check_distributed_checkpoint_metadata(path)  # before torch unpickles it
        FileSystemReader(str(path)).read_metadata()
        load_weights_only(path / _METADATA_FILENAME)
        missing = missing_shards(path)
        if missing:
            raise FileNotFoundError(f"no shard files {shown(', '.join(missing[:4]))}")
        check_distributed_checkpoint_values(path)  # its pickled entries, before torch loads them
    except UnsafeFileError:
        raise
    except Exception as err:  # missing or truncated files, a half-written save
        raise ValueError(
            f"checkpoint folder {path} is incomplete or corrupted ({type(err).__name__}: {err}); "
            f"{_RESUME_EARLIER}"
        ) from err
    return path


def missing_shards(folder: str | Path) -> list[str]:
    """The files a sharded checkpoint's metadata names that ``folder`` lacks or holds short:
    the shards of ranks that wrote them elsewhere (a node-local disk)."""
    from torch.distributed.checkpoint import FileSystemReader

    sizes: dict[str, int] = {}  # each file's end, from every entry stored in it
    for info in (FileSystemReader(str(folder)).read_metadata().storage_data or {}).values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    files = {name: Path(folder) / name for name in sizes}
    return sorted(
        name for name, file in files.items() if not file.is_file() or file.stat().st_size < sizes[name]
    )


def unreadable_checkpoint(path: Path, err: BaseException) -> ValueError:
    """The one-line error for a sharded checkpoint that passed the checks above but failed to
    load; names the shard whose checksum fails, if one does (reads every shard)."""
    from torch.distributed.checkpoint import FileSystemReader

    damaged = None
    with contextlib.suppress(Exception):  # an unreadable metadata file: the error names it
        damaged = _first_corrupted_shard(path, FileSystemReader(str(path)).read_metadata())
    failures = getattr(err, "failures", None)  # DCP's CheckpointException: every rank's error
    if failures:
        err = next(iter(failures.values()))[0]  # (exception, traceback)
    first_line = next(iter(str(err).strip().splitlines()), "")
    shard = f"; its shard {damaged} is corrupted (a CRC check fails)" if damaged else ""
    return ValueError(
        f"checkpoint folder {path} could not be loaded ({type(err).__name__}: {first_line}){shard}; "
        f"{_RESUME_EARLIER}"
    )


def _first_corrupted_shard(path: Path, metadata) -> str | None:
    """The first shard file holding an item that is not an intact zip archive (each item of a
    DCP shard is written by ``torch.save``, whose archive has a CRC per member)."""
    for item in sorted(metadata.storage_data.values(), key=lambda i: (i.relative_path, i.offset)):
        with open(path / item.relative_path, "rb") as f:
            f.seek(item.offset)
            intact = intact_archive(f.read(item.length))
        if not intact:
            return item.relative_path
    return None


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path, sharded: bool | None = None) -> str | None:
    """``None`` -> None; ``last`` -> the newest intact one of ``checkpoints/{preempted,last}.ckpt``
    in ``output_dir`` (a damaged newer one is passed over with a warning; an error if none is
    left); otherwise the given path. The checkpoint is checked, and with ``sharded`` False (a
    trainer that is not FSDP2) it must be a single file."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        return str(check_checkpoint_file(_loadable_by(ckpt_path, sharded)))
    folder = Path(output_dir) / "checkpoints"
    found = [folder / name for name in RESUMABLE_NAMES if (folder / name).exists()]
    if not found:
        raise FileNotFoundError(
            f"ckpt_path=last but {folder} holds no {' or '.join(RESUMABLE_NAMES)}; run with the "
            "same output folder (hydra.run.dir=<the run's folder>) or give ckpt_path=<file>"
        )
    damaged: list[ValueError] = []
    for candidate in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            path = check_checkpoint_file(candidate)
        except ValueError as err:
            damaged.append(err)
            continue
        for err in damaged:
            log.warning("%s; ckpt_path=last resumes from %s, the newest intact one",
                        str(err).split(f"; {_RESUME_EARLIER}")[0], path)
        return _loadable_by(str(path), sharded)
    raise damaged[0]


def _loadable_by(path: str, sharded: bool | None) -> str:
    """``path``, unless it is a sharded (FSDP2) folder and the trainer is not FSDP2: Lightning
    would fail deep in its load with ``IsADirectoryError``."""
    if sharded is False and Path(path).is_dir():
        raise ConfigError(
            f"checkpoint {path} is a sharded (FSDP2) checkpoint folder, which only an FSDP2 trainer "
            "loads: resume it with trainer=fsdp (or the trainer config that wrote it)"
        )
    return path
