"""The fused (token-chunked) log-prob/entropy head: values, gradients, and what it keeps in memory."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from relift_pl.algorithms import fused_logprobs_entropy, logprobs_and_entropy


def _problem(tokens=7, hidden=6, vocab=11, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    # Distinct weights per token, so a gradient routed to the wrong token shows.
    weights_lp = torch.randn(tokens, generator=g, dtype=dtype)
    weights_ent = torch.randn(tokens, generator=g, dtype=dtype)
    return h, w, b, labels, weights_lp, weights_ent


def _loss_and_grads(logprobs, entropy, weights_lp, weights_ent, inputs):
    loss = (logprobs * weights_lp).sum()
    if entropy is not None and entropy.requires_grad:
        loss = loss + (entropy * weights_ent).sum()
    grads = torch.autograd.grad(loss, [x for x in inputs if x is not None])
    return loss.detach(), grads


@pytest.mark.parametrize("entropy", ["grad", "no_grad", None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(("token_chunk", "bias"), [(1, True), (3, False), (100, True)])
def test_matches_unfused_path(entropy, temperature, token_chunk, bias):
    h, w, b, labels, a, c = _problem(bias=bias)
    lp, ent = fused_logprobs_entropy(
        h, w, labels, bias=b, temperature=temperature, token_chunk=token_chunk, entropy=entropy
    )
    # Values: the same float32 formula as the unfused path.
    ref_lp, ref_ent = logprobs_and_entropy(
        F.linear(h, w, b)[None], labels[None], temperature, entropy=entropy
    )  # [1, T]
    torch.testing.assert_close(lp, ref_lp[0], atol=1e-6, rtol=1e-6)
    if entropy is None:
        assert ent is None
    else:
        torch.testing.assert_close(ent, ref_ent[0], atol=1e-6, rtol=1e-6)
        assert ent.requires_grad == (entropy == "grad")
    # Gradients: equal to the unfused float32 path up to float32 rounding (1e-6 of the largest
    # entry), and no further than it from the float64 result (both lose digits alike where the
    # entropy lse - sum(p z) cancels).
    _, grads = _loss_and_grads(lp, ent, a, c, (h, w, b))
    _, ref_grads = _loss_and_grads(
        ref_lp[0], None if ref_ent is None else ref_ent[0], a, c, (h, w, b)
    )
    h64, w64, b64 = (None if x is None else x.detach().double().requires_grad_() for x in (h, w, b))
    logp64 = torch.log_softmax(F.linear(h64, w64, b64) / temperature, dim=-1)  # [T, V] float64
    lp64 = logp64.gather(1, labels[:, None])[:, 0]
    ent64 = -(logp64.exp() * logp64).sum(-1) if entropy == "grad" else None
    _, grads64 = _loss_and_grads(lp64, ent64, a.double(), c.double(), (h64, w64, b64))
    for grad, ref, exact in zip(grads, ref_grads, grads64, strict=True):
        scale = ref.abs().max().item()
        torch.testing.assert_close(grad, ref, atol=1e-6 * scale, rtol=0)
        fused_error = (grad.double() - exact).abs().max().item()
        unfused_error = (ref.double() - exact).abs().max().item()
        assert fused_error <= unfused_error + 1e-6 * scale


def test_uniform_distribution_by_hand():
    # A zero weight gives uniform logits: log p(y) = -log V and H = log V whatever the hidden state.
    # d log p_y / dz = onehot(y) - 1/V; dz/dW = h / T_temp, so dW = (onehot(y) - 1/V)^T h / T_temp.
    # dH/dz = -p (log p + H) = -(1/V)(-log V + log V) = 0: the uniform law is the entropy's maximum.
    vocab, temperature = 4, 0.5
    h = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    w = torch.zeros(vocab, 2, requires_grad=True)
    labels = torch.tensor([0, 3])
    lp, ent = fused_logprobs_entropy(h, w, labels, temperature=temperature, token_chunk=1)
    torch.testing.assert_close(lp, torch.full((2,), -math.log(vocab)))
    torch.testing.assert_close(ent, torch.full((2,), math.log(vocab)))
    (grad_w,) = torch.autograd.grad(lp.sum(), w, retain_graph=True)
    onehot = F.one_hot(labels, vocab).float()  # [2, V]
    torch.testing.assert_close(grad_w, (onehot - 1 / vocab).T @ h.detach() / temperature)
    (grad_w_ent, grad_h_ent) = torch.autograd.grad(ent.sum(), (w, h))
    torch.testing.assert_close(grad_w_ent, torch.zeros_like(w))
    torch.testing.assert_close(grad_h_ent, torch.zeros_like(h))


def test_backward_passes_finite_differences():
    # The hand-derived backward against numerical derivatives, in float64.
    h, w, b, labels, a, c = _problem(tokens=5, hidden=3, vocab=6, dtype=torch.float64)

    def weighted(h, w, b):
        lp, ent = fused_logprobs_entropy(h, w, labels, bias=b, temperature=0.7, token_chunk=2)
        return (lp * a).sum() + (ent * c).sum()

    assert torch.autograd.gradcheck(weighted, (h, w, b))


def test_autocast_recompute_matches_forward_dtype():
    # Under bf16 autocast the logits are bf16 matmuls; the backward must recompute them in bf16
    # whether or not autocast is still on when it runs.
    h, w, b, labels, a, c = _problem(tokens=9, hidden=8, vocab=13, bias=False)
    grads = []
    for backward_in_autocast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, ent = fused_logprobs_entropy(h, w, labels, temperature=0.7, token_chunk=4)
            if backward_in_autocast:
                grads.append(_loss_and_grads(lp, ent, a, c, (h, w))[1])
        if not backward_in_autocast:
            grads.append(_loss_and_grads(lp, ent, a, c, (h, w))[1])
    for first, second in zip(*grads, strict=True):
        torch.testing.assert_close(first, second, atol=0, rtol=0)
    # Same numbers as the unfused path under autocast (bf16 logits upcast to float32).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_lp, ref_ent = logprobs_and_entropy(F.linear(h, w)[None], labels[None], 0.7)
    torch.testing.assert_close(lp, ref_lp[0], atol=1e-6, rtol=1e-6)
    ref_grads = _loss_and_grads(ref_lp[0], ref_ent[0], a, c, (h, w))[1]
    for grad, ref in zip(grads[0], ref_grads, strict=True):
        assert grad.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(grad, ref, atol=2e-2, rtol=2e-2)  # bf16 gradient rounding


def test_rejects_bad_arguments():
    h, w, _, labels, _, _ = _problem()
    with pytest.raises(ValueError, match="token_chunk"):
        fused_logprobs_entropy(h, w, labels, token_chunk=0)
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs_entropy(h, w, labels, temperature=0.0)
    with pytest.raises(ValueError, match="entropy"):
        fused_logprobs_entropy(h, w, labels, entropy="yes")


def _peak_bytes(fn) -> int:
    """Peak bytes of CPU tensors alive during fn() (inputs created beforehand excluded)."""
    tracker = MemTracker()
    with tracker:
        fn()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("tokens", [256, 512])
def test_peak_memory_is_bounded_by_the_chunk(tokens):
    vocab, hidden, chunk = 2048, 8, 32
    h, w, _, labels, a, c = _problem(tokens=tokens, hidden=hidden, vocab=vocab, bias=False)
    row = chunk * vocab * 4  # one [chunk, V] float32 buffer
    full = tokens * vocab * 4  # one [T, V] float32 tensor

    def fused():
        lp, ent = fused_logprobs_entropy(h, w, labels, temperature=0.7, token_chunk=chunk)
        _loss_and_grads(lp, ent, a, c, (h, w))

    def unfused():
        lp, ent = logprobs_and_entropy(F.linear(h, w)[None], labels[None], 0.7)
        _loss_and_grads(lp[0], ent[0], a, c, (h, w))

    # A few [chunk, V] float32 buffers (logits, softmax, logsumexp's temporaries; measured: 3.3
    # in forward, 3.1 in backward), plus the weight gradient [V, H] and [T] / [T, H] terms: the
    # same bound for 256 and 512 tokens.
    fused_peak = _peak_bytes(fused)
    assert fused_peak <= 5 * row + 2 * vocab * hidden * 4 + 4 * tokens * (hidden + 8) * 4
    # The unfused path holds several [T, V] float32 tensors at once (logits, softmax, grads).
    assert _peak_bytes(unfused) >= 3 * full
