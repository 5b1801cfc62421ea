"""Log-prob of the label and entropy straight from hidden states, one token chunk at a time.

The vocabulary projection of a micro-batch is [T, V]: for Qwen2.5 (V = 152,064) and T = 32,768
tokens one float32 copy is ~20 GB, and the unfused path (`logprobs_and_entropy`) keeps two of them
for backward when the entropy is differentiable (the scaled logits and the softmax), plus
temporaries. Here the logits of at most `token_chunk` tokens exist at any time: the forward keeps
only per-token scalars (logsumexp, entropy) and the backward recomputes each chunk's logits from
the hidden states and the weight. The idea is that of Liger-Kernel's fused linear cross-entropy and
verl's fused log-prob kernels, written here in plain PyTorch.

Gradients, with z = logits / temperature, p = softmax(z), lse = logsumexp(z), H = lse - sum(p z):

    d log p_y / dz = onehot(y) - p
    d H / dz       = -p * (log p + H)        (log p = z - lse)

so dL/dz = g_lp * (onehot(y) - p) - g_H * p * (log p + H), and dL/dlogits = dL/dz / temperature.

Precision: the matmul runs in the compute dtype (the autocast dtype under autocast, else the
hidden states' dtype), its output is upcast to float32 for the softmax, exactly as the unfused path
does with the model's logits; the backward recomputes with the same dtype (autocast is switched off
inside and the casts are explicit, so forward and recomputation agree whatever autocast state the
backward runs under). The weight gradient is accumulated over chunks in the weight's dtype: exact
in float32; in bfloat16 (FSDP2's unsharded parameters) it is rounded once per chunk rather than
once per micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ENTROPY_MODES = ("grad", "no_grad", None)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision logits (as the unfused path), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _scaled_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, dtype: torch.dtype
) -> Tensor:
    """[c, V] logits / temperature (float32 or wider) of a chunk of hidden states [c, H]."""
    logits = F.linear(hidden.to(dtype), weight, bias).to(_softmax_dtype(dtype))  # a fresh tensor
    return logits.div_(temperature) if temperature != 1.0 else logits


class _FusedLogprobEntropy(torch.autograd.Function):
    """(log p(label), entropy) per token of softmax(hidden @ weight.T / temperature)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, token_chunk, entropy, dtype):
        device_type = hidden.device.type
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)  # no copy when the weight already has the compute dtype
            b = None if bias is None else bias.to(dtype)
            logprobs = hidden.new_empty(hidden.shape[0], dtype=_softmax_dtype(dtype))  # [T]
            lse = torch.empty_like(logprobs)  # [T]
            ent = torch.empty_like(logprobs) if entropy is not None else None  # [T]
            for start in range(0, hidden.shape[0], token_chunk):
                rows = slice(start, start + token_chunk)
                scaled = _scaled_logits(hidden[rows], w, b, temperature, dtype)  # [c, V]
                lse[rows] = torch.logsumexp(scaled, dim=-1)
                logprobs[rows] = scaled.gather(1, labels[rows, None])[:, 0] - lse[rows]
                if ent is not None:
                    probs = (scaled - lse[rows, None]).exp_()  # [c, V]
                    ent[rows] = lse[rows] - probs.mul_(scaled).sum(dim=-1)
        # Per-token scalars only: the backward recomputes the chunks' logits.
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent if entropy == "grad" else None)
        ctx.temperature, ctx.token_chunk, ctx.dtype = temperature, token_chunk, dtype
        if entropy == "no_grad":
            ctx.mark_non_differentiable(ent)
        return logprobs, ent

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ent is None:  # entropy not differentiable (or not computed): no gradient through it
            grad_entropy = None
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        temperature, dtype = ctx.temperature, ctx.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [T, H]
        grad_weight = torch.zeros_like(weight) if need_weight else None  # [V, H]
        grad_bias = torch.zeros_like(bias) if need_bias else None  # [V]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, hidden.shape[0], ctx.token_chunk):
                rows = slice(start, start + ctx.token_chunk)
                h = hidden[rows].to(dtype)  # [c, H]
                g_lp = grad_logprobs[rows, None]  # [c, 1]
                log_probs = _scaled_logits(h, w, b, temperature, dtype).sub_(lse[rows, None])
                probs = log_probs.exp()  # [c, V]
                if grad_entropy is not None:
                    # g_lp + g_H * (log p + H), in the log-probs' buffer
                    log_probs.add_(ent[rows, None]).mul_(grad_entropy[rows, None]).add_(g_lp)
                    grad_z = probs.mul_(log_probs).neg_()  # [c, V]
                else:
                    grad_z = probs.mul_(-g_lp)
                del log_probs  # at most two [c, V] float32 buffers live at once
                grad_z.scatter_add_(1, labels[rows, None], g_lp)  # the onehot(y) term
                if temperature != 1.0:
                    grad_z.div_(temperature)
                grad_logits = grad_z.to(dtype)  # [c, V], the dtype the logits were computed in
                if need_hidden:
                    grad_hidden[rows] = grad_logits @ w
                if need_weight:
                    if grad_weight.dtype == dtype:
                        grad_weight.addmm_(grad_logits.T, h)
                    else:  # e.g. float32 weight under bfloat16 autocast
                        grad_weight.add_(grad_logits.T @ h)
                if need_bias:
                    grad_bias.add_(grad_logits.sum(dim=0))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype `F.linear(hidden, weight)` would compute in: autocast's, else the input's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def fused_logprobs_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    token_chunk: int = 4096,
    entropy: str | None = "grad",
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `labels` and entropies under softmax((hidden @ weight.T + bias) / temperature).

    Equal to `logprobs_and_entropy(F.linear(hidden, weight, bias), labels, temperature)` in values
    and gradients, without ever holding more than `token_chunk` rows of [T, V] logits, in the
    forward or the backward pass.

    Args:
        hidden: [T, H] final hidden states (one row per predicted token).
        weight: [V, H] output projection (the LM head's weight).
        labels: [T] token ids to score.
        bias: [V] output bias, or None.
        temperature: sampling temperature, > 0.
        token_chunk: tokens whose [token_chunk, V] logits are materialised at once.
        entropy: ``"grad"`` (differentiable), ``"no_grad"`` (metrics only: returned without
            autograd history, nothing extra saved) or None (not computed).

    Returns:
        (logprobs [T], entropy [T] or None), float32 (float64 for float64 logits),
        differentiable w.r.t. `hidden`, `weight` and `bias`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if token_chunk < 1:
        raise ValueError(f"token_chunk must be >= 1, got {token_chunk}")
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"entropy must be 'grad', 'no_grad' or None, got {entropy!r}")
    return _FusedLogprobEntropy.apply(
        hidden, weight, bias, labels, float(temperature), int(token_chunk), entropy,
        compute_dtype(hidden),
    )  # fmt: skip
