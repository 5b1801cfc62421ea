"""Sample logging and plain-text progress: which training step they report, and when."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.progress import StepProgressBar, progress_line
from callbacks.sample_logger import SampleCompletionsLogger


class RecordingTensorBoard(TensorBoardLogger):
    def __init__(self) -> None:
        self.texts: list[tuple[str, int]] = []

    @property
    def experiment(self):
        return SimpleNamespace(add_text=lambda tag, text, global_step: self.texts.append((tag, global_step)))


def _step(callback, logger, step_count: int) -> None:
    """One on_rl_step_end call as ReLIFTModule makes it: before it increments step_count."""
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger])
    module = SimpleNamespace(step_count=step_count, algo=SimpleNamespace(group_size=2))
    record = SimpleNamespace(
        rows=[{"problem": "1+1", "answer": "2"}], responses=["2", "3"],
        group_rewards=torch.tensor([[1.0, 0.0]]),
    )
    callback.on_rl_step_end(trainer, module, record)


def test_samples_are_labelled_with_the_step_their_metrics_are_logged_at():
    logger = RecordingTensorBoard()
    callback = SampleCompletionsLogger(every_n_steps=3)
    for step_count in range(7):  # training steps 1..7
        _step(callback, logger, step_count)
    assert logger.texts == [("samples/completions", 3), ("samples/completions", 6)]


def test_every_n_steps_0_is_off():
    logger = RecordingTensorBoard()
    callback = SampleCompletionsLogger(every_n_steps=0)
    for step_count in range(3):
        _step(callback, logger, step_count)
    assert logger.texts == []
    with pytest.raises(ValueError, match="every_n_steps must be >= 0"):
        SampleCompletionsLogger(every_n_steps=-1)


def test_progress_line():
    assert progress_line(40, 80, 62.0, 40, 0.5312, 40, 12) == (
        "step 40/80 | elapsed 1:02 | 1.55 s/step | ETA 1:02 | reward 0.531 | RL/SFT steps 40/12"
    )
    # A resumed run: s/step over the steps this process ran; no reward (SFT only) is left out.
    assert progress_line(30, 40, 7200.0, 10, None, 0, 30) == (
        "step 30/40 | elapsed 2:00:00 | 720.00 s/step | ETA 2:00:00 | RL/SFT steps 0/30"
    )


def test_plain_progress_lines_when_stdout_is_not_a_terminal(capsys):
    bar = StepProgressBar(text_every_n_steps=2)
    module = SimpleNamespace(step_count=0, max_steps=5, rl_step=0, sft_step=0)
    trainer = SimpleNamespace(
        is_global_zero=True, progress_bar_metrics={"reward_mean": torch.tensor(0.25)},
        lightning_module=module,
    )
    bar.setup(trainer, module, "fit")  # capsys: stdout is not a terminal
    assert bar.is_disabled  # no Rich bar drawn once, at the end
    for _ in range(5):
        bar.on_train_batch_start(trainer, module, None, 0)
        module.step_count += 1
        module.rl_step += 1
        bar.on_train_batch_end(trainer, module, None, None, 0)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    assert lines[-1].endswith("| reward 0.250 | RL/SFT steps 5/0")


@pytest.mark.parametrize(("max_steps", "every"), [(100, 5), (80, 4), (10, 1)])
def test_plain_progress_default_period(max_steps, every):
    bar = StepProgressBar()
    module = SimpleNamespace(step_count=0, max_steps=max_steps)
    bar.setup(SimpleNamespace(is_global_zero=True, lightning_module=module), module, "fit")
    assert bar._text_every == every  # max(1, max_steps // 20)
