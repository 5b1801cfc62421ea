"""scripts/gpu_check.py's model and batches (Qwen2.5-0.5B's shape, built from config), and the
pure-torch algorithm modules it benchmarks; shared by its two parts."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Qwen2Config, Qwen2ForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def _load_algorithms():
    """relift_pl.algorithms.{logprobs,losses}: pure torch. Falls back to loading the files by path
    if the package __init__ picks up an import this machine lacks."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        logprobs = importlib.import_module("relift_pl.algorithms.logprobs")
        losses = importlib.import_module("relift_pl.algorithms.losses")
    except ImportError as err:
        print(f"[note] package import failed ({err}); loading the algorithm files by path")
        mods = {}
        # In import order: each file imports the ones before it by their package names.
        for name in ("aggregation", "fused_head", "head_swap", "logprobs", "losses"):
            path = REPO_ROOT / "relift_pl" / "algorithms" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(f"relift_pl.algorithms.{name}", path)
            mods[name] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mods[name])
        logprobs, losses = mods["logprobs"], mods["losses"]
    return logprobs.policy_logprobs, losses.PolicyGradientLoss, losses.SFTLoss


policy_logprobs, PolicyGradientLoss, SFTLoss = _load_algorithms()


# ----------------------------------------------------------------------------------------------
# Model and data


def model_config(args: argparse.Namespace, layers: int) -> Qwen2Config:
    """Qwen2.5-0.5B's shape (or a tiny one for --cpu-smoke), sdpa attention."""
    if args.cpu_smoke:
        shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2)  # fmt: skip
    else:
        shape = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                     num_attention_heads=14, num_key_value_heads=2)  # fmt: skip
    config = Qwen2Config(num_hidden_layers=layers, tie_word_embeddings=True,
                         max_position_embeddings=4096, use_cache=False, **shape)  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


def build_model(config: Qwen2Config, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random-init model created directly on `device` in `dtype` (no CPU init, no hub)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    # No model.to(dtype): that would also cast the fp32 rotary inv_freq buffer.
    return model.to(device).train()


@dataclass
class Batch:
    input_ids: Tensor  # [B, P + R]
    attention_mask: Tensor  # [B, P + R]; all ones: no padding, causal flash path
    response_mask: Tensor  # [B, R]
    advantages: Tensor  # [B]
    num_response: int


def make_batch(mb: int, prompt: int, response: int, vocab: int, device: torch.device) -> Batch:
    ids = torch.randint(0, vocab, (mb, prompt + response), device=device)
    return Batch(ids, torch.ones_like(ids), torch.ones(mb, response, device=device),
                 torch.randn(mb, device=device), response)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_text(err: BaseException, limit: int = 400) -> str:
    return f"{type(err).__name__}: {err}"[:limit]
