"""The algorithm's knobs, as one dataclass that Hydra fills from ``conf/algorithm/*.yaml``, and
:class:`ConfigError`, the error every config check raises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


class ConfigError(ValueError):
    """A bad config value (found before any model loads where it can be), or a bad file one
    names: a data row, an untrusted checkpoint. The message is one line that names the key (or
    file and row) and says what to do; train.py / evaluate.py print it without a traceback."""


@dataclass
class AlgorithmConfig:
    """What one training step does. ``grpo``, ``relift`` and ``sft`` differ only in these values."""

    group_size: int = 8
    """Rollouts per prompt (G)."""
    rl_enabled: bool = True
    """Run rollouts and the policy-gradient update (off for SFT-only baselines)."""
    sft_enabled: bool = True
    """Run an SFT step whenever the buffer holds ``buffer_threshold`` rows (off for GRPO)."""
    scale_advantages_by_std: bool = False
    """Divide group advantages by the group std (GRPO); the ReLIFT reference does not (Dr.GRPO)."""
    num_mini_batches: int = 1
    """Optimizer steps per RL step: the rollout batch is split into this many mini-batches."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass; gradients are accumulated by hand."""
    sft_micro_batch_size: int = 16
    """Demonstrations per forward/backward pass in the SFT step."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget per micro-batch (rows x longest row), RL and SFT alike; rows are sorted by
    length and packed up to it (and at most ``*micro_batch_size`` rows). None: fixed counts."""
    share_prompt_prefix: bool = True
    """Log-prob passes run each distinct prompt once and its G responses against that prompt's KV
    cache (same values and gradients up to float32 rounding; the prompt's cost drops G-fold).
    Off under FSDP2, and whenever the model cannot (gradient checkpointing)."""
    logprob_token_chunk: int | None = None
    """Log-probs and entropies from the final hidden states this many tokens at a time inside
    the model's forward, recomputed in backward: no [tokens, vocab] logits are ever held (at a
    152k vocabulary, a 32k-token micro-batch is ~20 GB of float32 logits per copy). None: full
    logits (fine for small vocabularies and budgets)."""
    defer_grad_sync: bool = False
    """Under FSDP2, reduce-scatter gradients once per optimizer step (on the last micro-batch)
    instead of after every micro-batch. It saves a reduce-scatter per micro-batch (small next to
    the backward it overlaps) at the cost of full-size float32 unsharded gradients per rank while
    micro-batches accumulate (28 GiB at 7B: scripts/plan_memory.py); off by default."""
    offload_sft_optimizer: bool = False
    """Keep the SFT AdamW's moments on the CPU between SFT steps (two Adam states over one
    model do not fit otherwise at 7B scale; the reference offloads too)."""
    rl_grad_clip: float = 1.0
    """Max grad norm of RL steps (reference scripts: 0.7)."""
    sft_grad_clip: float = 1.0
    """Max grad norm of SFT steps."""
    rl_loss_scale: float = 1.0
    """Multiplies the RL loss before backward (logged losses stay unscaled; ``rl/grad_norm`` is
    the scaled gradient's, the one the clip sees). Under AdamW only the grad clip and Adam's eps
    see it: it puts ``rl_grad_clip`` on another scale, e.g. the ReLIFT reference's, whose per-GPU
    loss is a sum over that GPU's sequences, not a mean (scripts/loss_scale.py)."""
    sft_loss_scale: float = 1.0
    """Multiplies the SFT step's loss before backward, like ``rl_loss_scale``."""
    buffer_threshold: int = 8
    """M: rows per SFT step; an SFT step runs when the buffer holds at least M."""
    buffer_capacity: int | None = None
    """Most rows kept (oldest dropped beyond it); default 4 x M."""
    sft_schedule: str = "buffer"
    """When an SFT step runs: ``buffer`` (ReLIFT: as soon as the buffer holds M rows),
    ``every_step`` (after every RL step, on the up-to-M newest buffered rows, if any: the paper's
    "SFT after every RL step" ablation) or ``interval`` (every ``sft_interval`` training steps,
    on M rows; with ``buffer_selection: all`` the paper's uniform-schedule ablation)."""
    sft_interval: int = 8
    """Training steps between SFT steps under ``sft_schedule: interval``."""
    sft_warmup_steps: int = 0
    """SFT-then-RL: the first this many training steps are SFT steps on every prompt's
    demonstration (no rollouts); RL runs afterwards."""
    sft_loss_coef: float = 0.0
    """RL-with-SFT-loss: every RL step's loss adds this x the SFT loss of the step's
    demonstrations (all prompts; one optimizer, the RL one). 0: off."""
    mix_demos: bool = False
    """LUFFY: each prompt's demonstration replaces the last of its G rollouts (G-1 samples + 1
    off-policy row), rewarded by the same reward and advantaged with its group; its tokens get
    ``pg_loss.shaping_gamma`` policy shaping, unclipped. Prompts without one, or whose
    demonstration is longer than ``rollout.sampling.max_new_tokens`` (skipped, counted in
    ``luffy/demos_too_long``), keep G samples."""
    buffer_selection: str = "hardest"
    """Which prompts' demonstrations enter the buffer: ``hardest`` (all G rollouts failed; ReLIFT),
    ``all`` (every prompt; SFT on all demonstrations) or ``random`` (as many as were hardest, drawn
    at random: the paper's ablation)."""
    max_consecutive_skips: int = 5
    """Abort after this many optimizer steps in a row were skipped for a non-finite grad norm."""
    pg_loss: nn.Module | None = None
    """The policy-gradient loss (``relift_pl.algorithms.PolicyGradientLoss``)."""
    sft_loss: nn.Module | None = None
    """The SFT loss (``relift_pl.algorithms.SFTLoss``)."""
    rl_optimizer: Callable | None = None
    """Partial optimizer over the policy's parameters for RL steps."""
    sft_optimizer: Callable | None = None
    """A second, separate partial optimizer for SFT steps (own moments, lr, weight decay)."""

    @property
    def demonstration_settings(self) -> list[str]:
        """The ``algorithm.<key>=<value>`` settings that make steps learn from demonstrations
        (none for GRPO)."""
        on = {"sft_enabled": self.sft_enabled, "sft_warmup_steps": self.sft_warmup_steps,
              "sft_loss_coef": self.sft_loss_coef, "mix_demos": self.mix_demos}  # fmt: skip
        return [f"algorithm.{key}={str(value).lower()}" for key, value in on.items() if value]

    @property
    def uses_sft_optimizer(self) -> bool:
        """Whether a separate SFT optimizer is needed (buffered SFT steps or an SFT warm-up)."""
        return runs_sft_steps(self.sft_enabled, self.sft_warmup_steps)

    def validate(self) -> None:
        def need(ok: bool, key: str, rule: str, value) -> None:
            if not ok:
                raise ConfigError(f"algorithm.{key} must be {rule}, got {value!r}")

        need(self.group_size >= 2 or not self.rl_enabled, "group_size", ">= 2 (GRPO compares samples within a group)", self.group_size)
        need(self.num_mini_batches >= 1, "num_mini_batches", ">= 1", self.num_mini_batches)
        need(self.micro_batch_size >= 1, "micro_batch_size", ">= 1", self.micro_batch_size)
        need(self.max_tokens_per_micro_batch is None or self.max_tokens_per_micro_batch >= 1,
             "max_tokens_per_micro_batch", ">= 1 or null", self.max_tokens_per_micro_batch)
        need(self.logprob_token_chunk is None or self.logprob_token_chunk >= 1,
             "logprob_token_chunk", ">= 1 or null", self.logprob_token_chunk)
        need(self.sft_micro_batch_size >= 1, "sft_micro_batch_size", ">= 1", self.sft_micro_batch_size)
        need(self.rl_grad_clip > 0, "rl_grad_clip", "> 0", self.rl_grad_clip)
        need(self.sft_grad_clip > 0, "sft_grad_clip", "> 0", self.sft_grad_clip)
        need(self.rl_loss_scale > 0, "rl_loss_scale", "> 0", self.rl_loss_scale)
        need(self.sft_loss_scale > 0, "sft_loss_scale", "> 0", self.sft_loss_scale)
        need(self.buffer_threshold >= 1, "buffer_threshold", ">= 1", self.buffer_threshold)
        need(self.buffer_capacity is None or self.buffer_capacity >= self.buffer_threshold,
             "buffer_capacity", f">= buffer_threshold (M={self.buffer_threshold}) or null (4 x M)",
             self.buffer_capacity)
        need(self.max_consecutive_skips >= 1, "max_consecutive_skips", ">= 1", self.max_consecutive_skips)
        need(self.buffer_selection in ("hardest", "all", "random"), "buffer_selection",
             "one of hardest, all, random", self.buffer_selection)
        need(self.rl_enabled or self.buffer_selection == "all", "buffer_selection",
             "'all' when rl_enabled is false (hardness needs rollouts)", self.buffer_selection)
        need(self.rl_enabled or self.sft_enabled, "rl_enabled / sft_enabled", "true for at least one", False)
        need(self.sft_schedule in ("buffer", "every_step", "interval"), "sft_schedule",
             "one of buffer, every_step, interval", self.sft_schedule)
        need(self.sft_interval >= 1, "sft_interval", ">= 1", self.sft_interval)
        need(self.sft_warmup_steps >= 0, "sft_warmup_steps", ">= 0", self.sft_warmup_steps)
        need(self.sft_warmup_steps == 0 or self.rl_enabled, "sft_warmup_steps",
             "0 when rl_enabled is false (the SFT-only run is algorithm=sft)", self.sft_warmup_steps)
        need(self.sft_loss_coef >= 0, "sft_loss_coef", ">= 0", self.sft_loss_coef)
        need(self.sft_loss_coef == 0 or self.rl_enabled, "sft_loss_coef",
             "0 when rl_enabled is false (it is added to RL steps)", self.sft_loss_coef)
        need(not self.mix_demos or self.rl_enabled, "mix_demos",
             "false when rl_enabled is false (demonstrations join rollout groups)", self.mix_demos)
        need(not (self.mix_demos and self.sft_enabled), "mix_demos",
             "false with sft_enabled (a group holding its rewarded demonstration is never hardest;"
             " algorithm=luffy turns the SFT steps off)", self.mix_demos)
        if self.rl_enabled:
            need(self.pg_loss is not None, "pg_loss", "set when rl_enabled", None)
            need(self.rl_optimizer is not None, "rl_optimizer", "set when rl_enabled", None)
        if self.sft_enabled or self.sft_warmup_steps or self.sft_loss_coef:
            need(self.sft_loss is not None, "sft_loss",
                 "set when sft_enabled, sft_warmup_steps or sft_loss_coef is on", None)
        if self.uses_sft_optimizer:
            need(self.sft_optimizer is not None, "sft_optimizer",
                 "set when sft_enabled or sft_warmup_steps > 0", None)


def runs_sft_steps(sft_enabled: bool, sft_warmup_steps: int) -> bool:
    """Whether a run takes SFT steps with the SFT optimizer: buffered ones or an SFT warm-up
    (SFT-then-RL has ``sft_enabled`` false)."""
    return sft_enabled or sft_warmup_steps > 0
