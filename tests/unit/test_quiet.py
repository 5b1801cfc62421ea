"""The library messages relift_pl.quiet silences, produced the way a run produces them."""

from __future__ import annotations

import logging
import os
import warnings

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from relift_pl.quiet import quiet_known_noise
from tests_helpers import MessageCollector

NOISE = (
    "💡 Tip: For seamless cloud logging",  # every Trainer()
    "`isinstance(treespec, LeafSpec)` is deprecated",  # Lightning's loops under torch 2.13
    "exists and is not empty",  # a resumed run's checkpoints folder
)
LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.trainer.connectors.checkpoint_connector")


class _TupleBatches(BoringModel):
    # A (tensor, tensor) batch: Lightning flattens it with its _pytree (the LeafSpec warning).
    def train_dataloader(self):
        data = [(torch.randn(32), torch.randn(2)) for _ in range(4)]
        return torch.utils.data.DataLoader(data, batch_size=2)

    def training_step(self, batch, batch_idx):
        return super().training_step(batch[0], batch_idx)


def test_known_noise_is_silenced_and_nothing_else(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "step-000001.ckpt").write_bytes(b"")  # a resumed run's folder is not empty
    said = MessageCollector()
    for name in LOGGERS:  # Lightning's loggers do not propagate to pytest's handler
        logging.getLogger(name).addHandler(said)
    try:
        with warnings.catch_warnings(record=True) as warned:
            quiet_known_noise(resuming=True)
            trainer = Trainer(
                max_steps=2, logger=CSVLogger(tmp_path), default_root_dir=tmp_path,
                enable_progress_bar=False, enable_model_summary=False,
                callbacks=[ModelCheckpoint(dirpath=folder)],
            )
            trainer.fit(_TupleBatches())
            trainer.save_checkpoint(folder / "preempted.ckpt", weights_only=False)  # as on preemption
    finally:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(said)
    messages = said.messages + [str(w.message) for w in warned]
    assert not [m for m in messages if any(noise in m for noise in NOISE)]
    assert not [m for m in messages if "`weights_only` was not set" in m]  # set at the source
    assert any("GPU available" in m for m in messages)  # the same logger's other messages stay


def test_vllm_logs_warnings_and_up_unless_the_user_asks_for_more(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    quiet_known_noise()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"  # read when vllm is first imported
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    quiet_known_noise()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO"
