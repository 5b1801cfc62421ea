"""What the update units receive instead of the LightningModule: the model they train with its
optimizer (:class:`Learner`) and the few counters they keep across training steps
(:class:`UpdateCounters`). The module builds a Learner for each update; a test builds one around a
bare model, with ``Tensor.backward`` for Lightning's ``manual_backward``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class UpdateCounters:
    """The counters the updates change; the module holds one, checkpoints it and logs it."""

    weights_version: int = 0
    """Optimizer steps applied, RL and SFT (the weight-sync callback pushes on a new one)."""
    skipped_steps: int = 0
    """Optimizer steps skipped for a non-finite grad norm."""
    consecutive_skips: dict[str, int] = field(default_factory=dict)
    """Skipped steps in a row, per optimizer (``rl`` / ``sft``): an SFT step must not hide RL NaNs."""
    mismatch_strikes: int = 0
    """RL steps in a row whose engine/trainer log-prob mean difference was above its bound."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": dict(self.consecutive_skips),
            "mismatch_strikes": self.mismatch_strikes,
            "weights_version": self.weights_version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = state["skipped_steps"]
        skips = state["consecutive_skips"]  # an int in checkpoints from before the per-optimizer count
        self.consecutive_skips = dict(skips) if isinstance(skips, dict) else {"rl": skips, "sft": skips}
        self.mismatch_strikes = state.get("mismatch_strikes", 0)  # absent in older checkpoints
        self.weights_version = state["weights_version"]


@dataclass
class Learner:
    """The policy an update trains, the optimizer it steps, and how its gradients are made."""

    policy: torch.nn.Module
    optimizer: Any = None
    """The update's optimizer (Lightning's wrapper or a plain torch optimizer)."""
    counters: UpdateCounters = field(default_factory=UpdateCounters)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backward: Callable[[Tensor], None] = Tensor.backward
    """Lightning's ``manual_backward`` in a run (precision plugin and strategy)."""
    sharded: bool = False
    """FSDP2 has sharded the policy (``configure_model``)."""
    reference: torch.nn.Module | None = None
    """The frozen starting policy the RL loss's KL term is taken against (None without KL)."""
    step: int = 1
    """The training step in progress, as logged (error messages name it)."""
    rl_step: int = 1
    """The RL step in progress, as logged."""
