"""Pushes the policy's weights into a colocated rollout engine (vLLM) before each rollout that needs it.

It lives in ``conf/callbacks/default.yaml`` for every run and does nothing when the engine samples
from the policy itself (``needs_weight_sync`` is False, the HF engine): one callback list serves
both engines, and switching ``rollout=vllm`` cannot forget the sync.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import lightning as L
import torch
from torch import Tensor

# Wrappers that insert a level into parameter names (torch.compile, FSDP1, activation
# checkpointing, DDP); the engine expects the Hugging Face checkpoint names.
WRAPPER_PREFIXES = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def hf_name(name: str) -> str:
    """Strips wrapper levels from a parameter name, keeping the Hugging Face name."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name.removeprefix("module.")


def full_named_tensors(
    policy: torch.nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yields ``(hf_name, full tensor)`` one at a time, in ``state_dict`` order.

    ``dtype``: floating tensors are cast to it first (the engine's dtype): the engine would cast
    the fp32 master weights anyway, and under FSDP2 the shard is cast before the all-gather, which
    halves what moves between GPUs for a bf16 engine.

    Under FSDP2 each parameter is a DTensor shard and ``full_tensor()`` is a collective: every
    rank must consume this iterator completely and in the same order (they all do, each pushing to
    its own engine). Tied weights go under both names: vLLM on CPU keeps a processed copy of a
    tied ``lm_head`` that is refreshed only when ``lm_head.weight`` itself arrives (measured: with
    it left out, the engine's log-probs stayed ~1 nat off after a push). Names and layouts are the
    policy's own; the engine turns them into the checkpoint's (fused MoE experts) as it loads.
    """
    for name, tensor in policy.state_dict(keep_vars=True).items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if hasattr(tensor, "full_tensor"):  # a DTensor under FSDP2
            tensor = tensor.full_tensor()
        yield hf_name(name), tensor


class VLLMWeightSync(L.Callback):
    """On ``on_before_rollout``: stream the policy into the engine if it changed since the last push.

    The module bumps ``weights_version`` after every applied optimizer step (RL or SFT); a push
    happens when that differs from the version last pushed, on the first rollout of the run (the
    engine started from the base checkpoint, which a resumed run has moved past), and whenever the
    engine dropped its weights (level-2 sleep). The engine resets its prefix cache after a push.
    Adds ``rollout/weight_sync_tensors`` to the step's metrics (the module logs the push's time as
    ``timing/weight_sync_s``).
    """

    def __init__(self) -> None:
        self.num_syncs = 0
        self.last_seconds = 0.0

    def on_before_rollout(self, trainer: L.Trainer, module) -> None:
        engine = module.rollout_engine
        if engine is None or not engine.needs_weight_sync:
            return
        if engine.synced_version == module.weights_version and not engine.weights_lost:
            return
        started = time.perf_counter()
        count = 0

        def counted() -> Iterator[tuple[str, Tensor]]:
            nonlocal count
            for item in full_named_tensors(module.policy, getattr(engine, "engine_dtype", None)):
                count += 1
                yield item

        stream = counted()
        with torch.no_grad():
            engine.load_weights(stream)
            for _ in stream:  # drain: under FSDP2 every rank must run every full_tensor()
                pass
        engine.synced_version = module.weights_version
        self.num_syncs += 1
        self.last_seconds = time.perf_counter() - started
        # Within a training step the module times the push (timing/weight_sync_s) and logs this
        # with the step's other metrics.
        module.metrics.add("rollout/weight_sync_tensors", float(count), reduce="same")
