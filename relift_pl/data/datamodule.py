"""The LightningDataModule: prompt batches for training, held-out sets for evaluation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from relift_pl.data.templates import demonstration_ids, prompt_ids

RowsFactory = Callable[[], list[dict[str, Any]]]


def _keep_rows(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Rows stay Python lists: rollout engines pad prompts themselves.
    return batch


class ReLIFTDataModule(L.LightningDataModule):
    """Serves tokenized rows ``{id, problem, answer, demonstration, prompt_ids, demo_ids, ...}``.

    Each training batch is this rank's share of the B prompts of one RL step. Lightning swaps
    the sampler for a DistributedSampler under DDP/FSDP, so every rank draws different prompts
    and keeps each prompt's whole group of G samples on one rank.

    Args:
        train_rows: builds the training rows (schema: id, problem, answer, demonstration).
        eval_sets: name -> builder of held-out rows for evaluation.
        tokenizer: the policy's tokenizer (with a chat template).
        batch_size: prompts per RL step over all ranks (the paper's B).
        system_prompt: system message for training prompts; evaluation drops it, as the
            reference does.
        max_prompt_length: longest prompt in tokens; longer rows are dropped and counted.
        max_demo_length: longest demonstration in tokens (EOS included).
        overlong_demos: ``drop`` (the row keeps its prompt but gets no demonstration) or
            ``truncate``.
        seed: shuffling seed.
    """

    def __init__(
        self,
        train_rows: RowsFactory,
        tokenizer,
        batch_size: int = 8,
        eval_sets: Mapping[str, RowsFactory] | None = None,
        system_prompt: str | None = None,
        max_prompt_length: int = 512,
        max_demo_length: int = 1024,
        overlong_demos: str = "drop",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if overlong_demos not in ("drop", "truncate"):
            raise ValueError(f"data.overlong_demos must be 'drop' or 'truncate', got {overlong_demos!r}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.train_rows_factory = train_rows
        self.eval_set_factories = dict(eval_sets or {})
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self.max_prompt_length = max_prompt_length
        self.max_demo_length = max_demo_length
        self.overlong_demos = overlong_demos
        self.seed = seed
        self.train_rows: list[dict[str, Any]] = []
        self.eval_sets: dict[str, list[dict[str, Any]]] = {}
        self.counts: dict[str, int] = {}

    # -- building rows ------------------------------------------------------------------------
    def _tokenize(self, rows: list[dict[str, Any]], system_prompt: str | None, with_demos: bool):
        out, too_long_prompts, overlong_demos = [], 0, 0
        for row in rows:
            ids = prompt_ids(self.tokenizer, row["problem"], system_prompt)
            if len(ids) > self.max_prompt_length:
                too_long_prompts += 1
                continue
            row = {**row, "prompt_ids": ids}
            if with_demos and row.get("demonstration"):
                demo = demonstration_ids(self.tokenizer, row["demonstration"])
                if len(demo) > self.max_demo_length:
                    overlong_demos += 1
                    demo = demo[: self.max_demo_length] if self.overlong_demos == "truncate" else None
                row["demo_ids"] = demo
            out.append(row)
        return out, too_long_prompts, overlong_demos

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows:
            return
        self.train_rows, dropped, overlong = self._tokenize(
            self.train_rows_factory(), self.system_prompt, with_demos=True
        )
        self.counts = {
            "train_rows": len(self.train_rows),
            "prompts_too_long": dropped,
            "demos_overlong": overlong,
            "demos_available": sum(r.get("demo_ids") is not None for r in self.train_rows),
        }
        for name, factory in self.eval_set_factories.items():
            self.eval_sets[name], _, _ = self._tokenize(factory(), None, with_demos=False)
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ValueError(
                f"data.batch_size={self.batch_size} must be divisible by the number of ranks ({world})"
            )
        if len(self.train_rows) < self.batch_size:
            raise ValueError(
                f"only {len(self.train_rows)} usable training rows, fewer than data.batch_size="
                f"{self.batch_size}"
            )

    @property
    def demos_available(self) -> int:
        return self.counts.get("demos_available", 0)

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(
            self.train_rows,
            batch_size=self.batch_size // world,
            shuffle=True,
            drop_last=True,
            collate_fn=_keep_rows,
            generator=torch.Generator().manual_seed(self.seed),
        )
