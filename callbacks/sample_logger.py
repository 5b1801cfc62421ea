"""Writes a few sampled completions to TensorBoard as text, so people can read what the policy says."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


class SampleCompletionsLogger(L.Callback):
    """Every ``every_n_steps`` training steps, logs ``num_samples`` (prompt, response, reward) rows.

    Args:
        every_n_steps: how often, in training steps (0: never).
        num_samples: rows per log (the first sample of the first prompts).
        max_chars: responses are cut to this many characters.
    """

    def __init__(self, every_n_steps: int = 10, num_samples: int = 4, max_chars: int = 2000) -> None:
        if every_n_steps < 0:
            raise ValueError(
                f"callbacks.sample_completions.every_n_steps must be >= 0 (0: off), got {every_n_steps}"
            )
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.max_chars = max_chars

    def on_rl_step_end(self, trainer: L.Trainer, module, record) -> None:
        # This runs inside training step step_count + 1 (the module counts it after the step):
        # label the samples with the step their metrics are logged at.
        step = module.step_count + 1
        if not self.every_n_steps or step % self.every_n_steps:
            return
        if record.responses is None or not trainer.is_global_zero:
            return
        group = module.algo.group_size
        lines = ["| problem | gold | response | reward |", "|---|---|---|---|"]
        for i, row in enumerate(record.rows[: self.num_samples]):
            response = record.responses[i * group][: self.max_chars]
            reward = float(record.group_rewards[i, 0])
            lines.append(f"| {_cell(row['problem'])} | {_cell(row['answer'])} | {_cell(response)} | {reward:g} |")
        text = "\n".join(lines)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples/completions", text, global_step=step)


def _cell(text: str) -> str:
    # Markdown table cells: keep pipes and newlines from breaking the row.
    return str(text).replace("|", "\\|").replace("\n", "<br>")
