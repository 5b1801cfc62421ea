"""The one rollout interface: prompts in, sampled responses out.

Every engine (Hugging Face ``generate``, vLLM) returns the same :class:`RolloutBatch`, so the
training step never knows which one produced it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. One instance for training rollouts, another for evaluation."""

    n: int = 1
    """Samples per prompt (GRPO's group size G)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    max_new_tokens: int = 64
    """Longest response, in tokens (EOS included)."""
    min_new_tokens: int = 0
    """EOS is masked until this many tokens (benchmarks use it to fix the length)."""
    seed: int | None = None
    """Per-call seed, for engines that take one."""

    def __post_init__(self) -> None:
        # "sampling.<field>": the trainer prefixes the config group (rollout.sampling.<field>).
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0: off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"sampling.min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )


@dataclass
class RolloutBatch:
    """Responses for ``len(prompts) * n`` samples, prompt-major (a prompt's n samples are adjacent).

    Prompts are left-padded and responses right-padded, so ``cat([prompt_ids, response_ids], 1)``
    is the sequence the trainer scores.
    """

    prompt_ids: Tensor  # [N, P] left-padded with the pad id
    prompt_mask: Tensor  # [N, P] 1 on real prompt tokens
    response_ids: Tensor  # [N, R] right-padded with the pad id
    response_mask: Tensor  # [N, R] 1 on generated tokens, the EOS included
    finish_reasons: list[str]  # N x "stop" (ended with EOS) | "length" (hit max_new_tokens)
    logprobs: Tensor | None = None  # [N, R] the engine's log-prob of each sampled token, if asked
    # [N] bool, True on rows holding a demonstration instead of a sample (LUFFY's off-policy rows,
    # relift_pl.update.mixing); None: every row was sampled by the engine.
    off_policy: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:  # [N, P + R]
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # [N, P + R]
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> Tensor:  # [N]
        return self.response_mask.sum(-1)

    @property
    def truncated(self) -> Tensor:  # [N] bool
        return torch.tensor([r == "length" for r in self.finish_reasons])

    @property
    def sampled(self) -> Tensor:  # [N] bool, on the CPU
        """True on the policy's own samples (not demonstrations mixed into their group)."""
        if self.off_policy is None:
            return torch.ones(self.response_ids.shape[0], dtype=torch.bool)
        return ~self.off_policy.cpu()


class RolloutEngine(ABC):
    """Generates responses for the current policy.

    Engines that keep their own copy of the weights (vLLM) set ``needs_weight_sync`` and receive
    the policy's parameters through :meth:`load_weights`; the HF engine samples from the policy
    itself and needs nothing.
    """

    needs_weight_sync: bool = False
    returns_logprobs: bool = False

    def bind(self, policy: torch.nn.Module, tokenizer) -> None:  # noqa: B027 (optional hook)
        """Called once in ``setup()`` with the policy and tokenizer, after the process group exists."""

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        """Samples ``sampling.n`` responses for each prompt (token ids, no padding)."""

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:  # noqa: B027
        """Receives full (unsharded) tensors under Hugging Face names, one at a time."""

    def close(self) -> None:  # noqa: B027
        """Frees the engine's resources."""

    def awake(self):
        """A context in which several generations run without freeing the engine between them
        (vLLM's sleep mode); a no-op for engines that never sleep."""
        return contextlib.nullcontext()


def generate_checked(
    engine: RolloutEngine, prompt_ids: list[list[int]], sampling: SamplingParams,
    weights_version: int, where: str, precision: contextlib.AbstractContextManager,
) -> RolloutBatch:
    """``engine.generate`` with what its caller relies on: an engine with its own weights holds
    the policy's ``weights_version``, a failure names the engine and ``where`` (when, and for
    what), and every prompt has its ``n`` responses. An engine that samples from the policy (HF)
    runs in the trainer's ``precision`` context; one with its own weights (vLLM) leaves it itself.
    """
    name = type(engine).__name__
    if engine.needs_weight_sync and getattr(engine, "synced_version", None) != weights_version:
        raise RuntimeError(
            f"{name} holds weights version {engine.synced_version}, the policy "
            f"is at {weights_version}: no callback pushed the weights. Keep "
            "callbacks.vllm_weight_sync (callbacks.VLLMWeightSync) in the callbacks config."
        )
    where = f"rollout engine {name} {where}, {len(prompt_ids)} prompts x n={sampling.n}"
    try:
        with contextlib.nullcontext() if engine.needs_weight_sync else precision:
            batch = engine.generate(prompt_ids, sampling)
    except Exception as err:  # engine internals (CUDA, vLLM workers): say who failed, and when
        raise RuntimeError(f"{where} failed: {type(err).__name__}: {err}") from err
    expected = len(prompt_ids) * sampling.n
    if batch.response_ids.shape[0] != expected or len(batch.finish_reasons) != expected:
        raise RuntimeError(
            f"{where} returned {batch.response_ids.shape[0]} responses, expected {expected}"
        )
    return batch


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pads token lists into ``(ids [N, L], mask [N, L])``."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-pads token lists into ``(ids [N, L], mask [N, L])``."""
    width = max((len(s) for s in sequences), default=0) if width is None else width
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = seq[:width]
        if seq:
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
    return ids, mask


def cut_at_eos(response_ids: Tensor, eos_ids: Iterable[int], pad_id: int) -> tuple[Tensor, Tensor, list[str]]:
    """Masks everything after the first EOS of each row.

    Args:
        response_ids: [N, R] raw generated tokens (engines pad finished rows arbitrarily).
        eos_ids: token ids that end a response.
        pad_id: id written after the EOS.

    Returns:
        ``(response_ids [N, R], response_mask [N, R], finish_reasons)``; the EOS itself is kept
        (the policy must learn to emit it).
    """
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= response_ids == eos
    # Tokens strictly after the first EOS: the running count of EOS seen before this position.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (eos_before == 0).long()  # [N, R]
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    reasons = ["stop" if row_has_eos else "length" for row_has_eos in is_eos.any(dim=1).tolist()]
    return ids, mask, reasons


@contextmanager
def outside_precision_context() -> Iterator[None]:
    """Leaves the trainer's precision context for an engine that keeps its own dtype (vLLM).

    Rollouts and weight pushes run inside ``training_step``, where Lightning's precision plugin has
    turned autocast on (``bf16-mixed``) or made bfloat16 the default dtype (``bf16-true``). Both
    reach into any model run in that thread: under autocast an fp32 engine's ``F.linear`` returns
    bfloat16 into its float32 kernels, and a bfloat16 default dtype changes every tensor the engine
    allocates without a dtype. Inside: autocast off for cpu and cuda, float32 default dtype; both
    restored on exit.
    """
    default_dtype = torch.get_default_dtype()
    with ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():  # autocast("cuda") warns on a machine without CUDA
            stack.enter_context(torch.autocast("cuda", enabled=False))
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(default_dtype)
