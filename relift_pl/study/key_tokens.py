"""How far a base is from its hardest demonstrations: the probability it gives each
demonstration's least likely tokens (teacher-forced, temperature 1).

A sampled response reproduces a demonstration only if it samples each of its tokens; the least
likely ones are the decisions RL would have to stumble on. When one token is far less likely than
the rest, whether RL ever finds level 4 hinges on that one draw (the second edition's world); the
third puts two such tokens in every level-4 demonstration.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from relift_pl.toy.base import sft_batch


@torch.no_grad()
def demo_token_probs(model, tokenizer, rows: Sequence[dict], batch_size: int = 64) -> list[list[float]]:
    """Per row: the probabilities of its demonstration's tokens (EOS included), ascending.

    Args:
        model: a causal LM (eval mode).
        tokenizer: its tokenizer (the chat template renders the prompt, as in training).
        rows: rows with ``problem`` and ``demonstration``.
    """
    out = []
    for start in range(0, len(rows), batch_size):
        batch = sft_batch(tokenizer, rows[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]  # [B, T-1]: the token each position predicts
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
        token = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
        for row_lp, row_labels in zip(token, labels, strict=True):
            out.append(sorted(row_lp[row_labels != -100].exp().tolist()))
    return out


def summary(probs: list[list[float]]) -> dict[str, float]:
    """Median and max over demonstrations of the least and second least likely token's
    probability, and of the whole demonstration's (the product of its tokens')."""
    lowest = [p[0] for p in probs]
    second = [p[1] for p in probs]
    whole = [float(torch.tensor(p, dtype=torch.float64).log().sum().exp()) for p in probs]
    return {"demonstrations": len(probs),
            "lowest_median": statistics.median(lowest), "lowest_max": max(lowest),
            "second_median": statistics.median(second), "second_max": max(second),
            "whole_median": statistics.median(whole), "whole_max": max(whole)}


def step_of(checkpoint: Path) -> int:
    """The training step of a ``step-000025.ckpt`` file."""
    found = re.fullmatch(r"step-(\d+)\.ckpt", checkpoint.name)
    if found is None:
        raise ValueError(f"{checkpoint}: not a step-NNNNNN.ckpt checkpoint")
    return int(found.group(1))


def checkpoint_curve(model, tokenizer, checkpoints: Sequence[Path], rows: Sequence[dict]) -> dict[int, dict]:
    """:func:`summary` of the policy each checkpoint holds (one process, single-file
    checkpoints), by training step: how RL moved the demonstrations' least likely tokens.

    Args:
        model: the run's base (its architecture; each checkpoint's weights replace its own).
    """
    from relift_pl.untrusted import load_weights_only

    curve = {}
    for checkpoint in sorted(checkpoints, key=step_of):
        state = load_weights_only(checkpoint)["state_dict"]
        weights = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        model.load_state_dict(weights)
        curve[step_of(checkpoint)] = summary(demo_token_probs(model.eval(), tokenizer, rows))
    return curve
