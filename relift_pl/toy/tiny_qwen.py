"""A tiny random Qwen2 with a byte-level BPE tokenizer: the paper's model, shrunk, built locally.

The paper rehearsal (``experiment=paper_rehearsal``) runs the 7B recipe's whole pipeline with
this model in its place. It is loaded through ``model.name_or_path`` like a hub model, so every
path a real Qwen2.5-Math checkpoint takes is taken: ``AutoTokenizer`` / ``AutoModelForCausalLM``,
the reference's ``<think>`` chat template (ChatML whose generation prompt opens ``<think>``),
stop tokens (its ``generation_config`` names only ``<|endoftext|>``, as Qwen2.5-Math's does, while
turns end with ``<|im_end|>``), rope_theta 40000 as in the "16k-think" base, untied embeddings as
in the 7B, bf16 weights on disk, and an attention head size vLLM's CPU kernels take. The weights are random: the
rehearsal checks mechanics, not accuracy.

The tokenizer is trained on the run's own text (MATH problems and solutions plus the system
prompt) so that prompts are tens of tokens, not thousands of bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from relift_pl.data.templates import QWEN_THINK_TEMPLATE
from relift_pl.toy.cache import cached_build

VERSION = 3
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
METADATA_FILE = "tiny_qwen.json"


def corpus_texts(corpus_file: str | Path | None, extra: tuple[str, ...] = (), limit: int = 4000) -> list[str]:
    """Problems and solutions of a JSON Lines file (MATH's fields) plus ``extra`` texts."""
    # Repeated: BPE merges the most frequent pairs, and each of these appears in every prompt.
    texts = [QWEN_THINK_TEMPLATE, "<think>\n</think>\n\nThe final answer is $\\boxed{42}$.", *extra] * 100
    if corpus_file and Path(corpus_file).exists():
        with open(corpus_file, encoding="utf-8") as handle:
            for line, _ in zip(handle, range(limit)):
                row = json.loads(line)
                texts += [str(row.get(k, "")) for k in ("problem", "solution", "answer")]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Qwen's kind) with Qwen's special tokens and the think template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        padding_side="left", chat_template=QWEN_THINK_TEMPLATE,
    )  # fmt: skip


def ensure_tiny_qwen(
    cache_dir: str | Path,
    *,
    corpus_file: str | Path | None = None,
    extra_texts: tuple[str, ...] | list[str] = (),
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 4096,
    rope_theta: float = 40000.0,
    seed: int = 0,
) -> Path:
    """A directory with the tiny model and its tokenizer, built once and cached by its settings.

    Args:
        cache_dir: where builds are cached (``<cache_dir>/tiny-qwen-<key>``).
        corpus_file: JSON Lines with ``problem`` / ``solution`` / ``answer`` to train the
            tokenizer on (None or missing: a built-in sample).
        extra_texts: more tokenizer training text (the run's system prompt: a few tokens, then).
        vocab_size: BPE vocabulary size.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the Qwen2 shape
            (head size hidden_size / num_heads must be one vLLM's CPU attention takes: 32, 64...).
        max_position_embeddings: context length.
        rope_theta: rotary base (the "16k-think" Qwen2.5-Math uses 40000).
        seed: initialisation seed.
    """
    corpus = Path(corpus_file) if corpus_file else None
    settings = dict(
        version=VERSION, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, rope_theta=rope_theta, seed=seed,
        corpus=[corpus.name, corpus.stat().st_size] if corpus and corpus.exists() else None,
        extra=hashlib.sha256("\n".join(extra_texts).encode()).hexdigest()[:12],
    )  # fmt: skip

    def build(tmp: Path) -> None:
        tokenizer = train_tokenizer(corpus_texts(corpus, tuple(extra_texts)), vocab_size)
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
            rope_theta=rope_theta, tie_word_embeddings=False,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        # Like Qwen2.5-Math's: generation stops only on <|endoftext|> (turns end with <|im_end|>).
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.eos_token_id
        # Saved in bf16 like Qwen's releases: the trainer then raises it to fp32 master weights
        # and the final export goes back to the checkpoint's dtype, as at 7B.
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return cached_build(cache_dir, "tiny-qwen", settings, METADATA_FILE, build)
