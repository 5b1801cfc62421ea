"""The LightningDataModule: prompt batches for training, held-out sets for evaluation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from relift_pl.config import ConfigError
from relift_pl.data.sampler import StepBatchSampler
from relift_pl.data.sources import RowProblem, bad_row_error, skipped_summary
from relift_pl.data.templates import prompt_text, resolve_chat_template, response_text
from relift_pl.data.token_ids import prompt_token_ids, text_ids
from relift_pl.quiet import rank_zero_logger

log = rank_zero_logger(__name__)  # every rank loads the same rows: rank 0 says so

RowsFactory = Callable[[], list[dict[str, Any]]]
DROPPED_DEMOS_WARNING = 0.5
"""Share of demonstrations dropped as too long above which the run warns."""


def check_data_settings(
    batch_size: int = 8,
    max_prompt_length: int = 512,
    max_demo_length: int = 1024,
    overlong_demos: str = "drop",
) -> None:
    """The datamodule's size settings; build() runs this before any model loads."""
    if overlong_demos not in ("drop", "truncate"):
        raise ConfigError(f"data.overlong_demos must be 'drop' or 'truncate', got {overlong_demos!r}")
    if batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
    for key, value in (("max_prompt_length", max_prompt_length), ("max_demo_length", max_demo_length)):
        if value < 1:
            raise ConfigError(f"data.{key} must be >= 1 (tokens), got {value}")


UNKEEPABLE = RowProblem(
    "has a special token's text in its problem that data.chat_template changes beyond trimming, so it "
    "cannot be kept apart from the template's control tokens (a template that inserts messages as "
    "they are keeps it: qwen_think does)"
)


def _unkeepable_rows(rows: list[dict[str, Any]], indices: list[int], name: str) -> None:
    """Reports rows whose problem the template would turn into control tokens: an error naming the
    source and the first row's id, or, when the source skips bad rows, a count and a warning."""
    source = getattr(rows, "source", name)
    if getattr(rows, "on_bad_row", "error") != "skip":
        raise bad_row_error(source, f"the row with id {rows[indices[0]]['id']!r}", UNKEEPABLE)
    for i in indices:
        rows.skip(f"id {rows[i]['id']!r}", UNKEEPABLE)
    log.warning(
        "%s: skipped %d rows: %s", source, len(indices),
        skipped_summary(Counter({UNKEEPABLE.kind: len(indices)}), rows.first_skipped),
    )  # fmt: skip


def _keep_rows(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Rows stay Python lists: rollout engines pad prompts themselves.
    return batch


class ReLIFTDataModule(L.LightningDataModule):
    """Serves tokenized rows ``{id, problem, answer, demonstration, prompt_ids, demo_ids, ...}``.

    Each training batch is this rank's share of the B prompts of one RL step, drawn by a
    :class:`StepBatchSampler` (with ``trainer.use_distributed_sampler=false``): ranks get
    different prompts, each prompt's whole group of G samples stays on one rank, and the data
    position is the step counter, so resuming is exact.

    Args:
        train_rows: builds the training rows (schema: id, problem, answer, demonstration).
        eval_sets: name -> builder of held-out rows for evaluation.
        tokenizer: the policy's tokenizer.
        batch_size: prompts per RL step over all ranks (the paper's B).
        system_prompt: system message for training prompts; evaluation drops it, as the
            reference does.
        chat_template: ``model`` (the tokenizer's), ``auto``, ``qwen_think`` or a Jinja
            template (see :mod:`relift_pl.data.templates`).
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
        chat_template: str = "model",
        max_prompt_length: int = 512,
        max_demo_length: int = 1024,
        overlong_demos: str = "drop",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_data_settings(batch_size, max_prompt_length, max_demo_length, overlong_demos)
        self.train_rows_factory = train_rows
        self.eval_set_factories = dict(eval_sets or {})
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self.template = resolve_chat_template(tokenizer, chat_template)
        self.max_prompt_length = max_prompt_length
        self.max_demo_length = max_demo_length
        self.overlong_demos = overlong_demos
        self.seed = seed
        self.train_rows: list[dict[str, Any]] = []
        self.eval_sets: dict[str, list[dict[str, Any]]] = {}
        self.counts: dict[str, int] = {}

    # -- building rows ------------------------------------------------------------------------
    def _tokenize(self, rows: list[dict[str, Any]], system_prompt: str | None, with_demos: bool, name: str):
        """Adds ``prompt_ids`` (and ``demo_ids``); returns (rows, counts of what was dropped).
        Problems and demonstrations are read as text: only the chat template adds special tokens
        (:mod:`relift_pl.data.token_ids`). ``name``: the rows' config key, for errors."""
        counts = {"prompts_too_long": 0, "demos_overlong": 0}
        problems = [r["problem"] for r in rows]
        prompts = [prompt_text(self.tokenizer, p, system_prompt, self.template) for p in problems]
        unkeepable: list[int] = []
        prompt_ids = prompt_token_ids(self.tokenizer, problems, system_prompt, self.template, prompts, unkeepable)
        if unkeepable:
            _unkeepable_rows(rows, unkeepable, name)
        out, kept_prompts = [], []
        for row, prompt, ids in zip(rows, prompts, prompt_ids, strict=True):
            if ids is None:
                continue  # skipped and counted above
            if len(ids) > self.max_prompt_length:
                counts["prompts_too_long"] += 1
                continue
            out.append({**row, "prompt_ids": ids})
            kept_prompts.append(prompt)
        if not with_demos:
            return out, counts
        has_demo = [i for i, row in enumerate(out) if row.get("demonstration")]
        responses = [response_text(kept_prompts[i], out[i]["demonstration"]) for i in has_demo]
        eos = [self.tokenizer.eos_token_id]  # appended: SFT teaches the model to stop
        for i, ids in zip(has_demo, text_ids(self.tokenizer, responses), strict=True):
            demo = ids + eos
            if len(demo) > self.max_demo_length:
                counts["demos_overlong"] += 1
                demo = demo[: self.max_demo_length] if self.overlong_demos == "truncate" else None
            out[i]["demo_ids"] = demo
        return out, counts

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows:
            return
        raw = self.train_rows_factory()
        self.train_rows, counts = self._tokenize(raw, self.system_prompt, with_demos=True, name="data.train_rows")
        self.counts = {
            "train_rows": len(self.train_rows),
            "rows_skipped": sum(getattr(raw, "skipped", {}).values()),
            **counts,
            "demos_available": sum(r.get("demo_ids") is not None for r in self.train_rows),
        }
        self.setup_eval_sets()
        log.info("data: %s", self.counts)
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ValueError(
                f"data.batch_size={self.batch_size} must be divisible by the number of ranks ({world})"
            )
        if len(self.train_rows) < self.batch_size:
            raise ValueError(
                f"only {len(self.train_rows)} usable training rows, fewer than data.batch_size="
                f"{self.batch_size} (counts: {self.counts}); raise data.max_prompt_length or lower "
                "data.batch_size"
            )

    def setup_eval_sets(self) -> None:
        """Loads and tokenizes only the eval sets (what ``evaluate.py`` needs), without a system
        prompt."""
        if self.eval_sets:
            return
        for name, factory in self.eval_set_factories.items():
            raw = factory()
            self.eval_sets[name], counts = self._tokenize(raw, None, with_demos=False, name=f"data.eval_sets.{name}")
            self.counts[f"eval/{name}/rows"] = len(self.eval_sets[name])
            dropped = counts["prompts_too_long"] + sum(getattr(raw, "skipped", {}).values())
            if dropped:
                self.counts[f"eval/{name}/dropped"] = dropped
                log.warning("eval set %s: %d problems dropped (malformed or prompt too long)", name, dropped)

    def check_demonstrations(self, needed_by: list[str]) -> None:
        """Refuses a run whose algorithm learns from demonstrations (``needed_by``: the settings
        that make it) when filtering left none; warns when it dropped a large share.

        Raises:
            ConfigError: one line naming the keys.
        """
        if not needed_by or not self.train_rows:
            return
        available = self.demos_available
        dropped = self.counts.get("demos_overlong", 0) if self.overlong_demos == "drop" else 0
        needs = f"{' and '.join(needed_by)} needs demonstrations"
        too_long = (
            f"longer than data.max_demo_length={self.max_demo_length} tokens (the toy worlds tie "
            "it to rollout.sampling.max_new_tokens)"
        )
        if available == 0 and dropped:
            raise ConfigError(
                f"{needs}, but all {dropped} are {too_long} and data.overlong_demos=drop dropped them: "
                "raise data.max_demo_length or set data.overlong_demos=truncate"
            )
        if available == 0:
            raise ConfigError(
                f"{needs}, but none of the {len(self.train_rows)} training rows has one: name the "
                "column with data.train_rows.columns.demonstration, or use algorithm=grpo"
            )
        if dropped >= DROPPED_DEMOS_WARNING * (available + dropped):
            log.warning(
                "data: %d of %d demonstrations are %s and were dropped (data.overlong_demos=drop); "
                "%s learns from the other %d", dropped, available + dropped, too_long,
                " and ".join(needed_by), available,
            )  # fmt: skip

    @property
    def demos_available(self) -> int:
        return self.counts.get("demos_available", 0)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        sampler = StepBatchSampler(
            num_rows=len(self.train_rows),
            global_batch_size=self.batch_size,
            seed=self.seed,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            # Read when iteration starts, after a checkpoint restored the module's step counter.
            start_step=lambda: getattr(module, "step_count", 0),
        )
        return DataLoader(self.train_rows, batch_sampler=sampler, collate_fn=_keep_rows)
