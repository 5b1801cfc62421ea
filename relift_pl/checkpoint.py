"""Checkpoint files: atomic writes, a ModelCheckpoint that counts training steps, resume lookup."""

from __future__ import annotations

import glob
import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

RESUMABLE_NAMES = ("preempted.ckpt", "last.ckpt")


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
    """ModelCheckpoint whose ``every_n_train_steps`` counts training steps (``module.step_count``).

    Lightning's count is ``global_step``, which advances by one or two per training step here
    (RL and SFT optimizer steps), so "every 50" would fire irregularly.
    """

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        n = self._every_n_train_steps
        if n < 1 or pl_module.step_count % n or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


def check_checkpoint_file(path: str | Path) -> Path:
    """Fails with a clear message if ``path`` is missing, truncated or corrupted (CRC check)."""
    path = Path(path)
    if path.is_dir():  # a distributed (FSDP2) checkpoint: Lightning validates it on load
        return path
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (ckpt_path)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(
            f"checkpoint {path} is truncated or corrupted ({err}); resume from an earlier one "
            "with ckpt_path=<path> (see the checkpoints/ folder)"
        ) from err
    if bad is not None:
        raise ValueError(f"checkpoint {path} is corrupted (bad member {bad}); resume from an earlier one")
    return path


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """``None`` -> None; ``last`` -> the newest of ``checkpoints/{preempted,last}.ckpt`` in
    ``output_dir`` (an error if there is none); otherwise the given path. The file is checked."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        folder = Path(output_dir) / "checkpoints"
        found = [folder / name for name in RESUMABLE_NAMES if (folder / name).exists()]
        if not found:
            raise FileNotFoundError(
                f"ckpt_path=last but {folder} holds no {' or '.join(RESUMABLE_NAMES)}; run with the "
                "same output folder (hydra.run.dir=<the run's folder>) or give ckpt_path=<file>"
            )
        ckpt_path = str(max(found, key=lambda p: p.stat().st_mtime))
    return str(check_checkpoint_file(ckpt_path))


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (sampling uses torch's global generator)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain types and tensors only: Lightning loads checkpoints with weights_only=True.
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's device only: each rank saves and restores its own (a resume on fewer or
        # other devices must not index devices it does not have).
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(nested_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every device's state
            device = torch.cuda.current_device()
            if device >= len(cuda):
                return
            cuda = cuda[device]
        torch.cuda.set_rng_state(cuda)


def nested_tuples(value):
    # random.setstate needs nested tuples; a checkpoint round trip may return lists.
    return tuple(nested_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
