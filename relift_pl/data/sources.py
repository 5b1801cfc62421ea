"""Row sources: local jsonl/parquet files or a hub dataset, mapped to the common row schema.

Every source yields rows ``{id, problem, answer, demonstration}`` (plus any kept extra columns),
the schema the toy world produces too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import load_dataset

DEFAULT_COLUMNS = {"id": "id", "problem": "problem", "answer": "answer", "demonstration": "solution"}


def _load(path_or_id: str, split: str):
    path = Path(path_or_id)
    suffixes = "".join(path.suffixes)
    if path.exists() or suffixes:
        if not path.exists():
            raise FileNotFoundError(f"data file {path_or_id!r} does not exist (check paths.data_dir)")
        kind = "parquet" if suffixes.endswith(".parquet") else "json"
        return load_dataset(kind, data_files=str(path), split="train")
    return load_dataset(path_or_id, split=split)  # a hub id: the path users with a network take


def load_rows(
    path: str,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    limit: int | None = None,
    demo_template: str = "{demonstration}",
    keep: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Loads rows and renames columns to the common schema.

    Args:
        path: a ``.jsonl``/``.json``/``.parquet`` file (``.gz`` works) or a hub dataset id.
        columns: schema field -> source column; ``demonstration`` may be absent (eval sets).
        split: the hub split to read (local files have one).
        limit: keep the first n rows.
        demo_template: turns a worked solution into the response format the reward checks,
            e.g. ``"{demonstration}\\n</think>\\n\\n\\boxed{{{answer}}}"``.
        keep: extra source columns to carry along (e.g. ``level``).
    """
    columns = {**DEFAULT_COLUMNS, **(columns or {})}
    dataset = _load(path, split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows = []
    for index, record in enumerate(dataset):
        row = {field: record.get(source) for field, source in columns.items() if source}
        row["id"] = str(row.get("id") if row.get("id") is not None else f"{Path(path).stem}-{index}")
        for field in ("problem", "answer"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise ValueError(
                    f"{path}: row {index} has no usable '{columns[field]}' ({field}); fix or drop the row"
                )
        if row.get("demonstration"):
            row["demonstration"] = demo_template.format(**row)
        row.update({name: record.get(name) for name in keep})
        rows.append(row)
    return rows
