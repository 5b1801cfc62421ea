"""The toy world's base policy: a tiny Qwen2 warm-started by plain SFT on the easy levels.

`ensure_toy_base` plays the role of "download Qwen2.5-Math": it returns a Hugging Face model
directory, trained once (a couple of minutes on one CPU thread) and cached under a key that hashes
every setting. The warm-start sees levels 1-2, a `middle_fraction` of level 3 and never level 4
(see `relift_pl.toy.world` for why that makes RL useful on 3 and SFT necessary on 4).

Level 3's warm-start demonstrations are complete only with probability `middle_full_rate`; the
others stop one step early and box the partial sum. SFT learns that mixture as a probability, so
the base finishes level 3 about `middle_full_rate` of the time at temperature 1. Why not simply
show a small fraction of complete level-3 demonstrations: the base then either never learns the
extra step or generalises it fully (level 3 at 2-65% across seeds, bimodal in a sweep), whereas
the mixture's level-3 accuracy follows the knob.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from relift_pl.toy import shipped as shipped_base
from relift_pl.toy import world2
from relift_pl.toy.cache import cached_build
from relift_pl.toy.tokenizer import build_toy_tokenizer
from relift_pl.toy.world import ToyWorldConfig, level_pool

BASE_VERSION = 1
"""Part of the cache key: bump it when the training recipe changes so stale bases are not reused."""

METADATA_FILE = "toy_base.json"
BUILD_FIGURES = {"final_loss", "n_params", "train_seconds"}
"""What a build adds to its settings in METADATA_FILE (`_train_base`'s figures)."""


def tiny_qwen2_config(vocab_size: int, **overrides: Any) -> Qwen2Config:
    """A ~0.28M-parameter Qwen2 config for the toy world (eos = pad = bos = id 0).

    Small on purpose: the warm-start and the whole toy ReLIFT run must fit minutes on one CPU
    thread. 96 wide x 3 layers reached the accuracy targets in the fewest CPU seconds of the sizes
    tried (64x3, 64x4, 96x3, 128x2, 128x3).

    Args:
        vocab_size: the tokenizer's `len(tokenizer)`.
        **overrides: any `Qwen2Config` field, e.g. `hidden_size=64, num_hidden_layers=1`.
    """
    settings: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,  # toy prompts <= 10, responses <= 29 tokens (with EOS)
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_cache=True,
    )
    settings.update(overrides)
    return Qwen2Config(**settings)


def ensure_toy_base(
    cache_dir: str | Path,
    *,
    warmstart_levels: Sequence[int] = (1, 2),
    middle_level: int = 3,
    middle_fraction: float = 0.1,
    middle_full_rate: float = 0.5,
    task_fraction: float = 0.0,
    steps: int = 900,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    world: ToyWorldConfig | None = None,
    model_overrides: dict[str, Any] | None = None,
    log_every: int = 50,
    device: str | torch.device = "cpu",
    rebuild: bool = False,
) -> Path:
    """Return a directory with the warm-started toy base (model + tokenizer).

    When these settings are those of a base the repository ships (`relift_pl.toy.shipped`), that
    base, after checking its files' sha256: a network trained here would be another machine's
    network. Otherwise (or with `rebuild`) the base is trained once and cached in
    `cache_dir/<key>`, the key a short hash of every setting below (not `log_every`, `device`,
    `rebuild`) and `BASE_VERSION`. Training happens in a temporary directory next to it that is
    renamed into place at the end, so a killed run never leaves a half-written base.

    Args:
        cache_dir: where bases are cached.
        warmstart_levels: levels the SFT warm-start draws from, uniformly.
        middle_level: the level the base should only sometimes solve.
        middle_fraction: share of warm-start examples drawn from `middle_level`.
        middle_full_rate: share of those whose demonstration is complete; the others stop one
            step early (a wrong answer), so the base solves `middle_level` only sometimes.
        task_fraction: share of warm-start examples drawn from the second world's digit tasks
            (`relift_pl.toy.world2.draw_pretraining_row`, the base of `experiment=toy2`); the
            arithmetic levels share the rest as above. 0 (the first world's base): none.
        steps: optimizer steps.
        batch_size: examples per step.
        lr: peak AdamW learning rate (linear warm-up, cosine decay to 10%).
        weight_decay: AdamW weight decay.
        seed: model init and data order.
        world: toy world knobs; `ToyWorldConfig()` when None.
        model_overrides: `tiny_qwen2_config` overrides.
        log_every: print progress every this many steps (0: silent).
        device: where to train (not part of the key: any device gives the same recipe).
        rebuild: train (or take from the cache) even when the settings are a shipped base's,
            and print whether the result is bitwise the shipped one (for whoever changes the
            world: ship the new base with `scripts/ship_toy_base.py`).

    Returns:
        Path loadable with `AutoModelForCausalLM.from_pretrained` and
        `AutoTokenizer.from_pretrained`; it also holds `toy_base.json` (settings and metrics).
    """
    world = world or ToyWorldConfig()
    settings = dict(
        version=BASE_VERSION,
        warmstart_levels=list(warmstart_levels),
        middle_level=middle_level,
        middle_fraction=middle_fraction,
        middle_full_rate=middle_full_rate,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        world=dataclasses.asdict(world),
        model_overrides=dict(sorted((model_overrides or {}).items())),
    )
    if task_fraction:  # only then: the first world's bases keep their cache keys
        settings["task_fraction"] = task_fraction
        settings["digit_tasks"] = world2.warmstart_recipe()
    shipped = shipped_base.find_shipped(settings, METADATA_FILE, BUILD_FIGURES)
    if shipped is not None and not rebuild:
        shipped_base.verify_shipped(shipped)
        return shipped
    path = cached_build(
        cache_dir, "toy-base", settings, METADATA_FILE,
        lambda tmp: _train_base(tmp, settings, world, model_overrides or {}, log_every, device),
    )  # fmt: skip
    if shipped is not None:
        print(shipped_base.compare_to_shipped(path, shipped), flush=True)
    return path


def _train_base(
    out: Path,
    settings: dict[str, Any],
    world: ToyWorldConfig,
    model_overrides: dict[str, Any],
    log_every: int,
    device: str | torch.device,
) -> dict[str, Any]:
    """Plain SFT (response tokens only) of a fresh tiny Qwen2; saves model + tokenizer to `out`."""
    start = time.perf_counter()
    tokenizer = build_toy_tokenizer()
    torch.manual_seed(settings["seed"])
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tokenizer), **model_overrides))
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.to(device)
    easy_pools = [level_pool("train", lvl, world) for lvl in settings["warmstart_levels"]]
    middle = settings["middle_level"]
    # Aligned pools: the same problems with complete and with one-step-short demonstrations.
    middle_full = level_pool("train", middle, world)
    middle_short = level_pool("train", middle, world, stop_after=-1)
    rng = random.Random(settings["seed"])
    task_fraction = settings.get("task_fraction", 0.0)

    def draw_row() -> dict:
        if task_fraction and rng.random() < task_fraction:
            return world2.draw_pretraining_row(rng)
        if rng.random() >= settings["middle_fraction"]:
            return rng.choice(rng.choice(easy_pools))
        i = rng.randrange(len(middle_full))
        return (middle_full if rng.random() < settings["middle_full_rate"] else middle_short)[i]

    steps, peak_lr = settings["steps"], settings["lr"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=peak_lr, betas=(0.9, 0.98), weight_decay=settings["weight_decay"]
    )
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return peak_lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return peak_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    model.train()
    loss_value, n_tokens = float("nan"), 0
    for step in range(steps):
        rows = [draw_row() for _ in range(settings["batch_size"])]
        batch = {k: v.to(device) for k, v in sft_batch(tokenizer, rows).items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value, n_tokens = loss.item(), n_tokens + int(batch["attention_mask"].sum())
        if log_every and (step + 1) % log_every == 0:
            elapsed = time.perf_counter() - start
            print(
                f"toy base warm-start step {step + 1}/{steps} loss {loss_value:.4f} "
                f"({n_tokens / elapsed:.0f} tok/s, {elapsed:.0f}s)",
                flush=True,
            )

    model.cpu().eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    return dict(final_loss=loss_value, n_params=n_params, train_seconds=time.perf_counter() - start)


def sft_batch(tokenizer: PreTrainedTokenizerFast, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Tokenize chat-template prompt + demonstration + EOS, left padded, loss on responses only.

    Returns:
        `input_ids`, `attention_mask` and `labels` (-100 on prompt and padding), each [B, T].
    """
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["problem"]}], add_generation_prompt=True, tokenize=False
        )
        for r in rows
    ]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([r["demonstration"] for r in rows], add_special_tokens=False)[
        "input_ids"
    ]
    seqs = [p + r + [tokenizer.eos_token_id] for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, p) in enumerate(zip(seqs, prompt_ids, strict=True)):
        input_ids[i, width - len(seq) :] = torch.tensor(seq)
        labels[i, width - len(seq) + len(p) :] = torch.tensor(seq[len(p) :])
        attention_mask[i, width - len(seq) :] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
