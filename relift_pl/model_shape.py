"""A decoder-only transformer's shape (`ModelShape`): what the memory plan
(:mod:`relift_pl.memory_plan`) computes from, read from a local config.json or the table of known
hub models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Qwen2 / Llama layout: q/k/v/o, SwiGLU MLP, two RMSNorms)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; Llama does not
    head_dim: int | None = None  # None: hidden // heads

    @property
    def dim(self) -> int:
        """Per-head width d."""
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        h, q, kv = self.hidden, self.heads * self.dim, self.kv_heads * self.dim
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embedding, final norm, LM head (if untied)."""
        embed = self.vocab * self.hidden
        return embed + self.hidden + (0 if self.tied_embeddings else embed)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.dim * dtype_bytes


# Hub ids with no network here: the numbers of their config.json.
KNOWN_MODELS = {
    "Qwen/Qwen2.5-Math-7B": ModelShape(
        "Qwen/Qwen2.5-Math-7B",
        hidden=3584,
        intermediate=18944,
        layers=28,
        heads=28,
        kv_heads=4,
        vocab=152064,
        tied_embeddings=False,
    ),  # fmt: skip
    "Qwen/Qwen2.5-Math-1.5B": ModelShape(
        "Qwen/Qwen2.5-Math-1.5B",
        hidden=1536,
        intermediate=8960,
        layers=28,
        heads=12,
        kv_heads=2,
        vocab=151936,
        tied_embeddings=True,
    ),  # fmt: skip
}


def model_shape_from_config(name: str, config: dict[str, Any]) -> ModelShape:
    """A `ModelShape` from a Hugging Face config.json dict (Qwen2 / Llama / Mistral keys)."""
    return ModelShape(
        name=name,
        hidden=config["hidden_size"],
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
        head_dim=config.get("head_dim"),
    )


def load_model_shape(name_or_path: str) -> ModelShape:
    """From `name_or_path`/config.json when it is a directory, else from `KNOWN_MODELS`."""
    config_file = Path(name_or_path) / "config.json"
    if config_file.is_file():
        return model_shape_from_config(str(name_or_path), json.loads(config_file.read_text()))
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path]
    raise KeyError(
        f"no config.json under {name_or_path!r} and not a known hub id ({sorted(KNOWN_MODELS)}); "
        "point model.name_or_path at a local model directory"
    )
