"""Row sources: local JSON Lines / parquet files or a hub dataset, mapped to the common row schema.

Every source yields rows ``{id, problem, answer, demonstration}`` (plus kept extra columns and an
optional ``grading`` mode), the schema the toy world produces too. Malformed rows stop loading
with an error naming the file and row, or are skipped and counted (``on_bad_row="skip"``).

Why local JSON Lines files are read with the standard ``json`` module rather than ``datasets``:
pyarrow's JSON reader rejects a whole file over one bad line without naming it, and when a column
mixes strings and numbers ``datasets`` turns it into a ``Json`` feature that silently decodes the
string ``"1"`` into the integer 1. Parquet files and hub ids go through ``datasets``.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from datasets import load_dataset, load_from_disk

from relift_pl.config import ConfigError
from relift_pl.data.row_checks import warn_about_rows
from relift_pl.quiet import rank_zero_logger
from relift_pl.rewards.extract import GRADING_MODES, THINK_CLOSE, last_boxed, split_think

log = rank_zero_logger(__name__)  # every rank loads the same rows: rank 0 says so

# Schema field -> source column. ``demonstration`` is off unless a preset names its column.
DEFAULT_COLUMNS: dict[str, str | None] = {
    "id": "id",
    "problem": "problem",
    "answer": "answer",
    "demonstration": None,
}
# A stated final answer: \boxed{...}, or MATH's brace-less "\boxed 5".
_FINAL_ANSWER = re.compile(r"\\(?:boxed|fbox)\s*(?:\{|[^\s{])")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class BadRowError(ConfigError):
    """A row that cannot be used; the message names the file, the row and the fix (one line:
    train.py / evaluate.py print it as they print config errors)."""


class RowProblem(NamedTuple):
    """Why a row is unusable."""

    kind: str
    """What is wrong, worded alike for every row it applies to: skipped rows are counted by it."""
    text: str = ""
    """This row's own description (positions, lengths), when it says more than ``kind``."""

    def __str__(self) -> str:
        return self.text or self.kind


class LoadedRows(list):
    """The usable rows of one source (a plain list) plus what was skipped and why.

    Attributes:
        source: the file or hub id the rows came from.
        skipped: kind of problem -> number of rows skipped (empty unless ``on_bad_row="skip"``).
        first_skipped: kind of problem -> the first skipped row of that kind and its details.
        on_bad_row: the source's setting: rows found unusable later (when tokenized) follow it.
    """

    def __init__(self, rows: list[dict[str, Any]], source: str, skipped: Counter,
                 first_skipped: dict[str, str] | None = None, on_bad_row: str = "error") -> None:  # fmt: skip
        super().__init__(rows)
        self.source = source
        self.skipped = skipped
        self.first_skipped = dict(first_skipped or {})
        self.on_bad_row = on_bad_row

    def skip(self, row: str, problem: RowProblem) -> None:
        """Counts one skipped row (``row``: how to find it, e.g. ``row 3`` or ``id 'x'``)."""
        self.skipped[problem.kind] += 1
        self.first_skipped.setdefault(problem.kind, f"{row}{': ' + problem.text if problem.text else ''}")


def bad_row_error(source: str, row: str, problem: RowProblem) -> BadRowError:
    """The one-line error for an unusable row when its source does not skip them."""
    return BadRowError(
        f"{source}: {row} {problem}. Fix or remove the row, or set on_bad_row=skip on this source "
        "to drop and count such rows."
    )


def skipped_summary(skipped: Counter, first_skipped: Mapping[str, str]) -> str:
    """``<count> <kind> (first: <row and details>)`` for each kind of skipped row."""
    return "; ".join(
        f"{count} {kind} (first: {first_skipped[kind]})" if kind in first_skipped else f"{count} {kind}"
        for kind, count in skipped.most_common()
    )


def _is_local(path_or_id: str) -> bool:
    name = path_or_id[:-3] if path_or_id.endswith(".gz") else path_or_id
    return Path(path_or_id).exists() or name.endswith(LOCAL_SUFFIXES)


def is_missing_local_path(path_or_id: str) -> bool:
    """A local file name (``.jsonl``, ``.parquet``, ...) that does not exist; hub ids are not."""
    return _is_local(path_or_id) and not Path(path_or_id).exists()


def _read_directory(path: Path, split: str) -> Iterator[dict[str, Any]]:
    """A ``save_to_disk`` folder (``load_from_disk``), else any folder ``load_dataset`` reads."""
    if (path / "dataset_dict.json").exists():  # a saved DatasetDict: one subfolder per split
        splits = load_from_disk(str(path))
        if split not in splits:
            raise ValueError(
                f"{path} holds the splits {sorted(splits)}, not {split!r}: set the source's split "
                "(e.g. data.train_rows.split)"
            )
        yield from splits[split]
    elif (path / "state.json").exists():  # a saved Dataset: it is the split
        yield from load_from_disk(str(path))
    else:
        yield from load_dataset(str(path), split=split)


def _read_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Yields one object per non-blank line of a (possibly gzipped) JSON Lines file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        yield from json.loads(text)
        return
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028 (GSM8K and GPQA do).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            raise BadRowError(f"{path}: line {number} is not valid JSON ({err.msg})") from err


def _records(path_or_id: str, split: str, subset: str | None) -> Iterator[dict[str, Any]]:
    if not _is_local(path_or_id):
        # A hub id: the path users with a network take (offline machines fail fast here).
        yield from load_dataset(path_or_id, subset, split=split)
        return
    path = Path(path_or_id)
    if not path.exists():
        raise FileNotFoundError(
            f"data file {path_or_id!r} does not exist: check paths.data_dir (env RELIFT_DATA_DIR) "
            "or the path in the data config"
        )
    if path.is_dir():
        yield from _read_directory(path, split)
    elif path.name.removesuffix(".gz").endswith(".parquet"):
        yield from load_dataset("parquet", data_files=str(path), split="train")
    else:
        yield from _read_json_lines(path)


def get_field(record: Mapping[str, Any], spec: str) -> Any:
    """Reads a possibly nested column: ``"answer"``, ``"reward_model.ground_truth"``,
    ``"prompt.-1.content"`` (the last message's content). Missing parts give None."""
    value: Any = record
    for part in spec.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, Sequence) and not isinstance(value, str):
            try:
                value = value[int(part)]
            except (ValueError, IndexError):
                return None
        else:
            return None
    return value


ANSWER_LIMIT_KEYS = (
    "data.train_rows.max_answer_chars=N (for an eval set: +data.eval_sets.<name>.max_answer_chars=N)"
)


def _problem_with_row(
    row: dict[str, Any], columns: Mapping[str, str | None], max_answer_chars: int
) -> RowProblem | None:
    """Why a mapped row is unusable (None when it is fine)."""
    for field in ("problem", "answer", "demonstration"):
        source = columns.get(field)
        if not source:
            continue
        value = row.get(field)
        if value is None:
            return RowProblem(f"has no '{source}' ({field})")
        if not isinstance(value, str):
            return RowProblem(f"has {type(value).__name__} in '{source}' ({field}), expected a string")
        if not value.strip():
            return RowProblem(f"has an empty '{source}' ({field})")
        try:  # JSON's "\ud800" escape decodes to a lone surrogate, which no tokenizer takes
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return RowProblem(
                f"has a lone surrogate in '{source}' ({field}), which is not text",
                f"has a lone surrogate ({value[err.start]!r}) at character {err.start} of "
                f"'{source}' ({field}), which is not text",
            )
    if columns.get("answer") and len(row["answer"]) > max_answer_chars:
        # Every rollout's grading would run into the grader's timeout (benchmark golds: <= 210).
        raise_it = f"if such golds are meant, raise it with {ANSWER_LIMIT_KEYS}"
        return RowProblem(
            f"has an '{columns['answer']}' (answer) longer than max_answer_chars={max_answer_chars}: "
            f"{raise_it}",
            f"has a {len(row['answer']):,}-character '{columns['answer']}' (answer), longer than "
            f"max_answer_chars={max_answer_chars}: {raise_it}",
        )
    if columns.get("demonstration") and not _FINAL_ANSWER.search(row["demonstration"]):
        return RowProblem("has a demonstration with no final \\boxed{} answer")
    return None


def _response_format_problem(demonstration: str) -> RowProblem | None:
    """Why a formatted demonstration would not earn reward (None when it would)."""
    _, answer_part = split_think(demonstration)
    if answer_part is None:
        return RowProblem(f"has a demonstration with no {THINK_CLOSE} once demo_template is applied")
    if last_boxed(answer_part) is None:
        return RowProblem(f"has a demonstration with no \\boxed{{}} after its last {THINK_CLOSE}")
    return None


def load_rows(
    path: str,
    columns: Mapping[str, str | None] | None = None,
    split: str = "train",
    subset: str | None = None,
    limit: int | None = None,
    demo_template: str = "{demonstration}",
    keep: Sequence[str] = (),
    grading: str | None = None,
    on_bad_row: str = "error",
    max_answer_chars: int = 1000,
) -> LoadedRows:
    """Loads rows, maps columns to the common schema, checks them.

    Args:
        path: a ``.jsonl``/``.json``/``.parquet`` file (``.gz`` works), a local dataset folder
            (``save_to_disk``'s, or one ``load_dataset`` reads), or a hub dataset id.
        columns: schema field -> source column, merged over :data:`DEFAULT_COLUMNS`. Dotted
            paths reach into nested columns (``reward_model.ground_truth``,
            ``prompt.-1.content``). ``id: null`` numbers the rows; ``demonstration: null``
            (the default) loads no demonstrations (eval sets).
        split: the split to read from a hub id or a folder (local files have one).
        subset: the hub config name, if the dataset has several.
        limit: keep the first n usable rows.
        demo_template: turns a demonstration into the response format the reward checks:
            reasoning, ``</think>``, a final ``\\boxed{}`` answer. Fields: ``{demonstration}``,
            ``{answer}``, ``{problem}``. Only checked when demonstrations are loaded.
        keep: extra source columns (dotted paths allowed) carried along under their own name.
        grading: ``math``, ``choice`` or ``auto``: how evaluation grades this set's answers
            (stored on each row); None leaves it to the reward's own ``mode``.
        on_bad_row: ``error`` (stop at the first malformed row) or ``skip`` (drop and count it).
        max_answer_chars: longest gold answer kept; a longer one is a malformed row.

    Loaded rows are also checked for golds the grader cannot read and for problems that repeat
    under another id: each is counted in a warning naming the first few ids
    (:mod:`relift_pl.data.row_checks`).

    Returns:
        The usable rows, as a :class:`LoadedRows` list that also records skipped rows.

    Raises:
        BadRowError: a malformed row, when ``on_bad_row="error"``; or duplicate ids.
        FileNotFoundError: a local path that does not exist.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if grading is not None and grading not in GRADING_MODES:
        raise ValueError(f"grading must be one of {GRADING_MODES} or null, got {grading!r}")
    columns = {**DEFAULT_COLUMNS, **(columns or {})}
    stem = Path(path).name.split(".")[0]
    rows = LoadedRows([], path, Counter(), on_bad_row=on_bad_row)
    first_seen: dict[str, int] = {}
    for index, record in enumerate(_records(path, split, subset)):
        if limit is not None and len(rows) >= limit:
            break
        row = {field: get_field(record, source) for field, source in columns.items() if source}
        problem = _problem_with_row(row, columns, max_answer_chars)
        if problem is None and columns.get("demonstration"):
            row["demonstration"] = demo_template.format(**row)
            problem = _response_format_problem(row["demonstration"])
        if problem is not None:
            if on_bad_row == "error":
                raise bad_row_error(path, f"row {index} (counting from 0)", problem)
            rows.skip(f"row {index}", problem)
            continue
        row_id = row.get("id")
        row["id"] = str(row_id) if row_id is not None else f"{stem}-{index}"
        if row["id"] in first_seen:
            raise BadRowError(
                f"{path}: rows {first_seen[row['id']]} and {index} share the id {row['id']!r}; "
                "ids must be unique (set columns.id: null to number rows instead)"
            )
        first_seen[row["id"]] = index
        row.update({name: get_field(record, name) for name in keep})
        if grading is not None:
            row["grading"] = grading
        rows.append(row)
    if rows.skipped:
        log.warning(
            "%s: skipped %d malformed rows: %s", path, sum(rows.skipped.values()),
            skipped_summary(rows.skipped, rows.first_skipped),
        )  # fmt: skip
    warn_about_rows(rows, path, grading)
    return rows
