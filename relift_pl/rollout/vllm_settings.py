"""The engine's settings as vLLM takes them: Hydra's containers as plain ones, the
``hf_overrides`` that would be ignored refused, and ``LOCAL_RANK`` set only while it starts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def vllm_local_rank(current: str | None) -> str:
    """LOCAL_RANK for vLLM's external-launcher worker, which takes it as its device index.

    On CUDA that is the device this process trains on (Lightning set it), not the rank modulo
    the device count: with ``trainer.devices=[2,3]`` ranks 0 and 1 train on GPUs 2 and 3. On
    CPU the launcher's value is kept (0 when none).
    """
    if torch.cuda.is_available():
        return str(torch.cuda.current_device())
    return current if current is not None else "0"


@contextmanager
def environ(name: str, value: str | None) -> Iterator[None]:
    """Sets (or, with None, leaves) an environment variable for the block, then restores it."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def plain(value: Any) -> Any:
    """An OmegaConf container (what Hydra passes) as plain dicts and lists, for vLLM."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return dict(value) if isinstance(value, dict) else value


def check_hf_overrides(overrides: dict[str, Any] | None) -> None:
    if overrides and "rope_theta" in overrides:
        # Transformers 5 keeps RoPE settings in config.rope_parameters and only fills missing
        # entries from a flat rope_theta, so the checkpoint's own theta would win silently.
        raise ValueError(
            "rollout.engine.hf_overrides.rope_theta is ignored by transformers 5 configs (the "
            "checkpoint's rope_parameters.rope_theta wins); set "
            "rollout.engine.hf_overrides.rope_parameters: {rope_type: default, rope_theta: "
            f"{overrides['rope_theta']}}} instead"
        )
