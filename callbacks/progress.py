"""Training progress: a Rich bar counting training steps on a terminal, plain lines in a log file."""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Shows ``step k/max_steps`` instead of Lightning's epoch counter: the data stream is
    endless and a run is sized in training steps.

    When stdout is not a terminal (redirected to a file), Rich would draw the bar only at the end,
    so the bar is off and rank 0 prints one flushed line every ``text_every_n_steps`` steps
    instead (see :func:`progress_line`).

    Args:
        text_every_n_steps: plain-line period in training steps; None: ``max(1, max_steps // 20)``;
            0: no lines.
        **kwargs: RichProgressBar's arguments.
    """

    def __init__(self, text_every_n_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if text_every_n_steps is not None and text_every_n_steps < 0:
            raise ValueError(
                "callbacks.progress_bar.text_every_n_steps must be >= 0 (0: off) or null, "
                f"got {text_every_n_steps}"
            )
        self.text_every_n_steps = text_every_n_steps
        self._text_every = 0  # 0: the Rich bar (a terminal)
        self._started: tuple[float, int] | None = None  # (time, step) of the first batch

    @property
    def total_train_batches(self) -> int:
        return self.trainer.lightning_module.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return "train steps"

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not sys.stdout.isatty():
            self.disable()
            n = self.text_every_n_steps
            self._text_every = max(1, pl_module.max_steps // 20) if n is None else n

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._started is None:
            self._started = (time.monotonic(), pl_module.step_count)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        # batch_idx restarts at 0 after a resume; the module's counter does not.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, pl_module.step_count - 1)
        step, every = pl_module.step_count, self._text_every
        if not every or not trainer.is_global_zero or (step % every and step < pl_module.max_steps):
            return
        started_at, first_step = self._started or (time.monotonic(), step - 1)
        reward = trainer.progress_bar_metrics.get("reward_mean")
        line = progress_line(
            step, pl_module.max_steps, time.monotonic() - started_at, step - first_step,
            None if reward is None else float(reward), pl_module.rl_step, pl_module.sft_step,
        )
        print(line, flush=True)


def progress_line(
    step: int, max_steps: int, elapsed: float, steps_done: int, reward: float | None,
    rl_steps: int, sft_steps: int,
) -> str:
    """``step 40/80 | elapsed 1:02 | 1.55 s/step | ETA 1:02 | reward 0.531 | RL/SFT steps 40/12``.

    ``steps_done``: steps run in this process (a resumed run starts past 0), for s/step and ETA.
    """
    per_step = elapsed / steps_done if steps_done > 0 else 0.0
    parts = [
        f"step {step}/{max_steps}",
        f"elapsed {_clock(elapsed)}",
        f"{per_step:.2f} s/step",
        f"ETA {_clock(per_step * max(max_steps - step, 0))}",
    ]
    if reward is not None:
        parts.append(f"reward {reward:.3f}")
    parts.append(f"RL/SFT steps {rl_steps}/{sft_steps}")
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
