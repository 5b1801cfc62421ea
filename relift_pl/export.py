"""The trained policy as a Hugging Face model directory: what users take to vLLM, lm-eval or the hub.

Under FSDP2 every rank holds a shard, so the full state dict is gathered (to rank 0's CPU, one
parameter at a time by torch's distributed state-dict API) and rank 0 writes the folder. The
tokenizer goes with it, carrying the chat template the run's prompts were rendered with and the
stop tokens it sampled with, so the exported model is prompted and stopped as it was trained.
The folder is written beside its final name and renamed into place: a reader never sees half a
model, and a kill mid-write leaves the previous export intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig

from relift_pl.distributed import world_size_and_rank


def full_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer as a full CPU tensor (on rank 0; empty elsewhere
    under FSDP2). A collective under FSDP2: every rank must call it."""
    if any(hasattr(p, "full_tensor") for p in policy.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(policy, options=options)
    return {name: value.detach().cpu() for name, value in policy.state_dict().items()}


def checkpoint_dtype(policy: torch.nn.Module) -> torch.dtype:
    """The dtype the policy's own checkpoint was saved in (bf16 for Qwen releases), which the run
    may have raised to float32 master weights; float32 when it cannot be read."""
    source = getattr(policy, "name_or_path", None)
    try:
        dtype = AutoConfig.from_pretrained(source).dtype if source else None
    except (OSError, ValueError):
        dtype = None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def export_hf(
    policy: torch.nn.Module, tokenizer, out_dir: str | Path, chat_template: str | None = None,
    dtype: str = "auto",
) -> Path | None:
    """Writes ``policy`` and ``tokenizer`` to ``out_dir`` atomically; returns it on rank 0.

    Args:
        policy: the trained causal LM (plain or FSDP2-sharded).
        tokenizer: its tokenizer.
        out_dir: the model directory to (re)write.
        chat_template: the Jinja template the run rendered prompts with (None: the tokenizer's).
        dtype: ``auto`` (the source checkpoint's dtype), or a torch dtype name (``float32``...).
    """
    state = full_state_dict(policy)
    out_dir = Path(out_dir)
    world, rank = world_size_and_rank()
    if rank == 0:
        target = checkpoint_dtype(policy) if dtype == "auto" else getattr(torch, dtype)
        for key, value in state.items():  # one tensor at a time: never two full copies at 7B
            if value.is_floating_point():
                state[key] = value.to(target)
        tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        config_dtype = policy.config.dtype
        try:  # the config.json written says the dtype of the weights it sits beside
            policy.config.dtype = target
            policy.config.save_pretrained(tmp)
        finally:
            policy.config.dtype = config_dtype
        saved_template = tokenizer.chat_template
        try:
            if chat_template is not None:
                tokenizer.chat_template = chat_template
            tokenizer.save_pretrained(tmp)
        finally:
            tokenizer.chat_template = saved_template
        replace_dir(tmp, out_dir)
    if world > 1:
        dist.barrier()
    return out_dir if rank == 0 else None


def replace_dir(new: Path, target: Path) -> None:
    """Puts folder ``new`` at ``target``: the old one is renamed aside, then removed, so at every
    moment ``target`` is either the complete old folder or the complete new one (or, after a kill
    between the two renames, ``<target>.old`` holds the previous one)."""
    old = target.with_name(f"{target.name}.old")
    _remove(old)
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    os.replace(new, target)
    _remove(old)


def _remove(path: Path) -> None:
    """Removes a folder, a file or a symlink (last.ckpt may link to a top-k checkpoint)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
