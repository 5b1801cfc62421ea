"""A run's random streams: what a checkpoint saves of them, per rank, and restores, so that a
resumed run draws exactly what the uninterrupted one would have."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from relift_pl.distributed import own_rank_state


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


def rank_rng_state(saved: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any] | None:
    """This rank's RNG state from a checkpoint: one state per rank (a list), or a single state
    (older checkpoints). A rank the checkpoint did not have keeps the streams ``setup()`` seeded
    for it (``seed + rank``)."""
    return saved if isinstance(saved, dict) else own_rank_state(saved, "random streams")
