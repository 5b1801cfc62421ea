"""Row sources: column mapping, malformed-row errors and skip counts, gz files, local dataset
folders, the OpenR1 schema."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict
from hydra.utils import instantiate

from data_fixtures import GOOD, OPENR1_ROWS
from relift_pl.data.sources import BadRowError, get_field, load_rows, skipped_summary

DEMO_TEMPLATE = "{demonstration}\n</think>\n\nThe final answer is $\\boxed{{{answer}}}$."
WITH_DEMOS = {"columns": {"demonstration": "solution"}, "demo_template": DEMO_TEMPLATE}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


BAD_ROWS = [
    pytest.param({"id": "x", "answer": "2", "solution": "\\boxed{2}"}, "has no 'problem'", id="missing-problem"),
    pytest.param({**GOOD, "id": "x", "answer": "  "}, "has an empty 'answer'", id="empty-answer"),
    pytest.param({**GOOD, "id": "x", "answer": 2}, "has int in 'answer'", id="non-string-answer"),
    pytest.param({**GOOD, "id": "x", "problem": ["a"]}, "has list in 'problem'", id="non-string-problem"),
    pytest.param({**GOOD, "id": "x", "solution": "so it is 2."}, "no final \\boxed{} answer", id="demo-without-answer"),
    pytest.param({**GOOD, "id": "x", "solution": None}, "has no 'solution'", id="missing-demo"),
    # JSON's "\ud800" escape: a lone surrogate, which the tokenizer refused with a bare TypeError.
    pytest.param(
        {**GOOD, "id": "x", "problem": "1+\ud800?"},
        "has a lone surrogate ('\\ud800') at character 2 of 'problem' (problem), which is not text",
        id="lone-surrogate",
    ),
    # Every rollout of it timed out in grading (16.8 s per group of 8).
    pytest.param(
        {**GOOD, "id": "x", "answer": "1" * 1_000_000},
        "has a 1,000,000-character 'answer' (answer), longer than max_answer_chars=1000: if such "
        "golds are meant, raise it with data.train_rows.max_answer_chars=N (for an eval set: "
        "+data.eval_sets.<name>.max_answer_chars=N)",
        id="megabyte-answer",
    ),
]


@pytest.mark.parametrize(("bad", "message"), BAD_ROWS)
def test_bad_row_error_names_file_row_and_fix(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, {**GOOD, "id": "ok2"}, bad])
    with pytest.raises(BadRowError) as err:
        load_rows(str(path), **WITH_DEMOS)
    text = str(err.value)
    assert str(path) in text and "row 2" in text
    assert message in text
    assert "on_bad_row=skip" in text  # says what to do


@pytest.mark.parametrize(("bad", "message"), BAD_ROWS)
def test_skip_knob_drops_and_counts(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, bad, {**GOOD, "id": "ok2"}])
    rows = load_rows(str(path), on_bad_row="skip", **WITH_DEMOS)
    assert [r["id"] for r in rows] == ["ok", "ok2"]
    assert sum(rows.skipped.values()) == 1
    assert message in skipped_summary(rows.skipped, rows.first_skipped)


def test_skipped_rows_are_counted_by_kind(tmp_path, caplog):
    # Rows whose problems differ only in position or length are one kind; the first's details show.
    bad = [{**GOOD, "id": f"s{i}", "problem": "1" * i + "\ud800"} for i in (2, 5)]
    bad += [{**GOOD, "id": f"a{n}", "answer": "1" * n} for n in (2000, 3000)]
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, *bad])
    rows = load_rows(str(path), on_bad_row="skip", **WITH_DEMOS)
    surrogate = "has a lone surrogate in 'problem' (problem), which is not text"
    too_long = (
        "has an 'answer' (answer) longer than max_answer_chars=1000: if such golds are meant, raise "
        "it with data.train_rows.max_answer_chars=N (for an eval set: "
        "+data.eval_sets.<name>.max_answer_chars=N)"
    )
    assert rows.skipped == {surrogate: 2, too_long: 2}
    warning = caplog.records[0].getMessage()
    assert warning.startswith(f"{path}: skipped 4 malformed rows: 2 {surrogate} (first: row 1: has a lone "
                              "surrogate ('\\ud800') at character 2 of 'problem' (problem), which is not text); "
                              f"2 {too_long} (first: row 3: has a 2,000-character 'answer' (answer),")  # fmt: skip


def test_the_answer_limit_is_a_data_key(make_cfg):
    assert make_cfg("data=math_train").data.train_rows.max_answer_chars == 1000


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n{not json\n")
    with pytest.raises(BadRowError, match=re.escape(f"{path}: line 3 is not valid JSON")):
        load_rows(str(path))


def test_u2028_inside_a_string_is_not_a_line_break(tmp_path):
    # str.splitlines() would cut this row in two (GSM8K and GPQA hold such characters).
    path = write_jsonl(tmp_path / "t.jsonl", [{**GOOD, "problem": "a\u2028b"}])
    assert load_rows(str(path))[0]["problem"] == "a\u2028b"


def test_duplicate_ids_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, GOOD])
    with pytest.raises(BadRowError, match="rows 0 and 1 share the id 'ok'"):
        load_rows(str(path))


def test_missing_file_names_the_path_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="paths.data_dir"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_template_must_yield_the_response_format(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    with pytest.raises(BadRowError, match="no </think> once demo_template is applied"):
        load_rows(str(path), columns={"demonstration": "solution"}, demo_template="{demonstration}")


def test_demo_template_builds_the_response_format(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    row = load_rows(str(path), keep=["solution"], grading="math", **WITH_DEMOS)[0]
    assert row["demonstration"] == "1+1=\\boxed{2}\n</think>\n\nThe final answer is $\\boxed{2}$."
    assert row["solution"] == GOOD["solution"] and row["grading"] == "math"


def test_gzip_limit_and_numbered_ids(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(5):
            f.write(json.dumps({"problem": f"p{i}", "answer": str(i)}) + "\n")
    rows = load_rows(str(path), columns={"id": None}, limit=3)
    assert [r["id"] for r in rows] == ["t-0", "t-1", "t-2"]
    assert [r["answer"] for r in rows] == ["0", "1", "2"]


def test_get_field_paths():
    record = {"a": {"b": [{"c": 1}, {"c": 2}]}, "s": "text"}
    assert get_field(record, "a.b.-1.c") == 2
    assert get_field(record, "a.b.0.c") == 1
    assert get_field(record, "a.b.5.c") is None
    assert get_field(record, "s.0") is None  # strings are not indexed into
    assert get_field(record, "missing.x") is None


def openr1_source(make_cfg, path: Path):
    """The preset's real row source, pointed at a local parquet file."""
    cfg = make_cfg("data=openr1_math", f"data.train_rows.path={path}")
    return instantiate(cfg.data.train_rows)


def test_openr1_parquet_schema_through_the_preset(make_cfg, tmp_path):
    path = tmp_path / "openr1.parquet"
    pd.DataFrame(OPENR1_ROWS).to_parquet(path)
    rows = openr1_source(make_cfg, path)()
    assert len(rows) == 4
    row = rows[3]
    assert row["problem"] == "What is 3+3?"  # the user turn; the dataset's system turn is dropped
    assert row["answer"] == "6"
    assert row["demonstration"] == OPENR1_ROWS[3]["target"][0]["content"]  # the trace, as is
    assert row["data_source"] == "olympiads"
    assert len({r["id"] for r in rows}) == 4  # extra_info.index (-1) is not used as the id


def test_openr1_trace_without_answer_after_think_is_rejected(make_cfg, tmp_path):
    broken = json.loads(json.dumps(OPENR1_ROWS))
    broken[1]["target"][0]["content"] = "<think>\nmaybe \\boxed{2}</think>\n\nI am not sure."
    path = tmp_path / "openr1.parquet"
    pd.DataFrame(broken).to_parquet(path)
    with pytest.raises(BadRowError, match=r"row 1 .*no \\boxed\{\} after its last </think>"):
        openr1_source(make_cfg, path)()


# -- local dataset folders (what load_dataset(dir) / save_to_disk produce) ---------------------
def _problems(rows) -> list[str]:
    return [r["problem"] for r in rows]


def test_save_to_disk_folder_loads(tmp_path):
    Dataset.from_list([{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": "4"}]).save_to_disk(
        tmp_path / "ds"
    )
    rows = load_rows(str(tmp_path / "ds"), columns={"id": None})
    assert _problems(rows) == ["1+1", "2+2"]
    assert [r["id"] for r in rows] == ["ds-0", "ds-1"]


def test_saved_dataset_dict_folder_loads_the_split(tmp_path):
    DatasetDict(
        train=Dataset.from_list([{"problem": "1+1", "answer": "2"}]),
        test=Dataset.from_list([{"problem": "3+3", "answer": "6"}]),
    ).save_to_disk(tmp_path / "dd")
    assert _problems(load_rows(str(tmp_path / "dd"), columns={"id": None}, split="test")) == ["3+3"]
    with pytest.raises(ValueError, match=r"holds the splits \['test', 'train'\], not 'valid'"):
        load_rows(str(tmp_path / "dd"), columns={"id": None}, split="valid")


def test_folder_of_data_files_loads_like_load_dataset(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{**GOOD, "id": "a"}, {**GOOD, "id": "b", "problem": "2+2"}])
    rows = load_rows(str(folder), **WITH_DEMOS)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[1]["problem"] == "2+2"


def test_golds_the_grader_cannot_read_are_counted_with_their_ids(tmp_path, caplog):
    unreadable = [r"\text{(E)},", r"\ldots", r"\text{ }"]  # math-verify reads no math in these
    rows = [{"id": f"u{i}", "problem": f"p{i}", "answer": a} for i, a in enumerate(unreadable)]
    rows += [{"id": "ok", "problem": "q", "answer": r"\frac{1}{2}"}, {"id": "n", "problem": "r", "answer": "7"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with caplog.at_level("WARNING"):
        assert len(load_rows(str(path), grading="math")) == 5  # kept: a warning, not an error
        load_rows(str(path), grading="choice")  # letters are not parsed
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"{path}: 3 of 5 gold answers cannot be read by math-verify")
    assert message.endswith(": u0, u1, u2")


def test_a_problem_repeated_under_another_id_is_counted(tmp_path, caplog):
    rows = [GOOD] + [{**GOOD, "id": f"copy{i}", "problem": " 1+1? " if i % 2 else "1+1?"} for i in range(7)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with caplog.at_level("WARNING"):
        assert len(load_rows(str(path))) == 8
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"{path}: 7 of 8 problems repeat an earlier row's under another id")
    assert message.endswith(": copy0 (= ok), copy1 (= ok), copy2 (= ok), copy3 (= ok), copy4 (= ok), ...")
