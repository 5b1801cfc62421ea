"""Running `fused_logprobs_entropy` inside a Hugging Face causal LM's own forward.

The fused head needs the LM head's weight. Under FSDP2 that weight is sharded outside the root
module's forward and all-gathered (in the compute dtype) inside it, and its gradient must reach the
parameter through autograd so FSDP2 reduce-scatters it. So the fused computation runs where the
model would call its head: for one forward, `replaced_lm_head` puts a `FusedLogprobHead` in the
head's slot (e.g. `model.lm_head`). It holds the original head module (not its weight: FSDP2 swaps
the module's parameter between sharded and unsharded), and returns per-token (log-prob, entropy)
where the model expected logits. Tied embeddings stay tied: the weight read is the module's own.

This is valid only for models whose forward returns `lm_head(hidden[:, keep])` unchanged as
`.logits`; `find_lm_head` allows known architectures, and `FusedLogprobHead.check_output` refuses
an output that is not the head's own tensor (a model that rescales or soft-caps its logits).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relift_pl.algorithms.fused_head import fused_logprobs_entropy

# Causal LMs (transformers 5) whose forward is `logits = self.lm_head(hidden[:, slice])`, returned
# as is. Others (Gemma 2/3 soft-cap, Cohere/Granite scale their logits, ...) use the full logits.
FUSABLE_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral", "gpt2"})


@dataclass(frozen=True)
class HeadSlot:
    """Where a causal LM keeps its output projection: ``getattr(parent, name) is lm_head``."""

    parent: nn.Module
    name: str
    lm_head: nn.Linear


def find_lm_head(model: nn.Module) -> tuple[HeadSlot | None, str]:
    """The head slot of the first Hugging Face causal LM in `model` (itself or a wrapped one).

    Returns:
        (slot, "") when the fused head applies, else (None, why not).
    """
    for module in model.modules():
        get_head = getattr(module, "get_output_embeddings", None)
        config = getattr(module, "config", None)
        if not callable(get_head) or config is None:
            continue
        lm_head = get_head()
        model_type = getattr(config, "model_type", None)
        if not isinstance(lm_head, nn.Linear):
            return None, f"{type(module).__name__}'s output embedding is not an nn.Linear"
        if model_type not in FUSABLE_MODEL_TYPES:
            return None, (
                f"model_type {model_type!r} is not known to return lm_head(hidden) unchanged as "
                f"its logits (fusable: {sorted(FUSABLE_MODEL_TYPES)})"
            )
        if getattr(config, "final_logit_softcapping", None):
            return None, "the model soft-caps its logits"
        for name, child in module.named_children():
            if child is lm_head:
                return HeadSlot(module, name, lm_head), ""
        return None, f"{type(module).__name__}'s output embedding is not a direct child"
    return None, "no Hugging Face causal LM (get_output_embeddings) in the model"


class FusedLogprobHead(nn.Module):
    """Stands in for an LM head for one forward; returns [N, r, 2] (log-prob, entropy) per token.

    The model calls it with hidden states [n, K, H] (K: the positions `logits_to_keep` kept). The
    head takes the r positions ending `drop_last` before the last, optionally gathers rows
    (`rows`: one hidden row per output row, for prompts run once and shared), and scores
    `labels` at the positions where `label_mask` is set; elsewhere both outputs are 0.

    Args:
        lm_head: the model's own head (its weight and bias are read at call time).
        labels: [N, r] token ids to score.
        label_mask: [N, r] bool, True where a label is a real token.
        temperature: sampling temperature, > 0.
        token_chunk: tokens whose logits are materialised at once.
        entropy: ``"grad"``, ``"no_grad"`` or None (see `fused_logprobs_entropy`).
        drop_last: trailing positions of the model's hidden states not scored.
        rows: [N] index into the n hidden rows, or None (n == N).
    """

    def __init__(
        self, lm_head: nn.Linear, labels: Tensor, label_mask: Tensor, *, temperature: float,
        token_chunk: int, entropy: str | None, drop_last: int = 0, rows: Tensor | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        # A plain reference, not a submodule: the model's parameter list stays as it was.
        self.__dict__["lm_head"] = lm_head
        self.labels, self.label_mask = labels, label_mask.bool()
        self.temperature, self.token_chunk, self.entropy = temperature, token_chunk, entropy
        self.drop_last, self.rows = drop_last, rows
        self.output: Tensor | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        width = self.labels.shape[1]
        end = hidden.shape[1] - self.drop_last
        if end < width:
            raise ValueError(
                f"the model kept {hidden.shape[1]} positions; {width + self.drop_last} needed"
            )
        selected = hidden[:, end - width : end]  # [n, r, H]
        if self.rows is not None:
            selected = selected[self.rows]  # [N, r, H]
        mask = self.label_mask
        logprobs, entropy = fused_logprobs_entropy(
            selected[mask],
            self.lm_head.weight,
            self.labels[mask],
            bias=self.lm_head.bias,
            temperature=self.temperature,
            token_chunk=self.token_chunk,
            entropy=self.entropy,
        )  # [T], [T] or None; T = real tokens
        zeros = logprobs.new_zeros(self.labels.shape)  # [N, r]
        columns = [zeros.masked_scatter(mask, logprobs)]
        columns.append(zeros if entropy is None else zeros.masked_scatter(mask, entropy))
        self.output = torch.stack(columns, dim=-1)  # [N, r, 2]
        return self.output

    def check_output(self, logits: Tensor) -> Tensor:
        """The model's `.logits`, verified to be this head's output untouched."""
        if self.output is None or logits is not self.output:
            raise RuntimeError(
                "the model did not return its LM head's output unchanged as .logits; the fused "
                "log-prob head cannot be used with it (token_chunk=None computes full logits)"
            )
        return logits


@contextmanager
def replaced_lm_head(slot: HeadSlot, head: nn.Module) -> Iterator[nn.Module]:
    """`head` sits in the model's head slot for the duration of the block; then the original."""
    setattr(slot.parent, slot.name, head)
    try:
        yield head
    finally:
        setattr(slot.parent, slot.name, slot.lm_head)
