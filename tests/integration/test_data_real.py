"""The data presets on the shared files (paths.data_dir): row counts, templates, demonstrations."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from hydra.utils import instantiate

from data_fixtures import GOOD, OPENR1_ROWS
from relift_pl.data.sources import BadRowError
from relift_pl.rewards import MathVerifyReward
from relift_pl.toy.tokenizer import build_toy_tokenizer
from tests_helpers import MessageCollector

BENCHMARK_ROWS = {
    "aime24": 30, "aime25": 30, "amc23": 83, "math500": 500, "minerva": 272,
    "olympiadbench": 675, "gpqa_diamond": 198, "arc_c": 1172,
}
QWEN_THINK = ["data.chat_template=qwen_think", "data/benchmarks@data.eval_sets=math500",
              "data.batch_size=2"]
# The toy tokenizer is character-level: long enough for every MATH prompt with the system prompt.
NO_PROMPT_LIMIT = "data.max_prompt_length=4096"


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


def datamodule(make_cfg, tokenizer, *overrides):
    dm = instantiate(make_cfg(*overrides).data, tokenizer=tokenizer)
    dm.setup("fit")
    return dm


def test_benchmarks_load_whole_with_their_grading(make_cfg):
    eval_sets = make_cfg("data=math_train").data.eval_sets
    assert set(eval_sets) == set(BENCHMARK_ROWS)
    for name, factory in eval_sets.items():
        rows = instantiate(factory)()
        assert len(rows) == BENCHMARK_ROWS[name], name
        grading = "choice" if name in ("gpqa_diamond", "arc_c") else "math"
        assert {row["grading"] for row in rows} == {grading}, name
    # GPQA is gzipped; ARC-c numbers some options 1-4 (graded as choices, not numbers).
    assert eval_sets.gpqa_diamond.path.endswith(".jsonl.gz")


@pytest.mark.parametrize(("preset", "rows"), [("math_train", 7469), ("gsm8k", 7473)])
def test_train_presets_load_every_row(make_cfg, preset, rows):
    loaded = instantiate(make_cfg(f"data={preset}").data.train_rows)()
    assert len(loaded) == rows and not loaded.skipped
    assert all(r["demonstration"].endswith(f"$\\boxed{{{r['answer']}}}$.") for r in loaded)


def test_math_train_prompts_and_demonstrations(make_cfg, tokenizer):
    dm = datamodule(make_cfg, tokenizer, "data=math_train", "data.train_rows.limit=40",
                    NO_PROMPT_LIMIT, *QWEN_THINK)
    assert dm.counts["train_rows"] == dm.demos_available == 40
    assert dm.counts["eval/math500/rows"] == 500
    system = make_cfg("data=math_train").data.system_prompt
    decode = tokenizer.decode
    row = dm.train_rows[0]
    prompt = decode(row["prompt_ids"])
    assert prompt.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{row['problem']}")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    # Evaluation drops the system prompt, keeps the think-opening generation prompt.
    eval_prompt = decode(dm.eval_sets["math500"][0]["prompt_ids"])
    assert eval_prompt.startswith("<|im_start|>user\n") and system not in eval_prompt
    assert eval_prompt.endswith("<think>\n")
    # Demonstrations: the worked solution, </think>, the boxed gold, EOS.
    source = Path(make_cfg("data=math_train").data.train_rows.path)
    solution = json.loads(source.read_text().split("\n", 1)[0])["solution"]
    demo = decode(row["demo_ids"])
    assert demo == (
        f"{solution}\n</think>\n\nThe final answer is $\\boxed{{{row['answer']}}}$."
        f"{tokenizer.eos_token}"
    )
    # SFT teaches what the reward checks: every demonstration earns reward 1 against its gold.
    texts = [decode(r["demo_ids"][:-1]) for r in dm.train_rows]
    with MathVerifyReward(num_workers=0) as reward:
        assert reward(texts, [r["answer"] for r in dm.train_rows]).rewards == [1.0] * 40


def test_long_prompts_are_dropped_and_counted(make_cfg):
    tokenizer = build_toy_tokenizer()  # its own: the tokenizer warns about long inputs only once
    said = MessageCollector()
    logging.getLogger("transformers").addHandler(said)  # transformers' loggers do not propagate
    try:
        dm = datamodule(make_cfg, tokenizer, "data=math_train", "data.train_rows.limit=40", *QWEN_THINK)
    finally:
        logging.getLogger("transformers").removeHandler(said)
    # Dropped and counted here; the tokenizer's "longer than the maximum" warning is noise.
    assert not [m for m in said.messages if "Token indices sequence length" in m]
    limit = dm.max_prompt_length
    assert dm.counts["prompts_too_long"] > 0
    assert dm.counts["train_rows"] + dm.counts["prompts_too_long"] == 40
    assert dm.counts["eval/math500/rows"] + dm.counts["eval/math500/dropped"] == 500
    assert max(len(r["prompt_ids"]) for r in dm.train_rows + dm.eval_sets["math500"]) <= limit


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_overlong_demonstrations(make_cfg, tokenizer, policy):
    dm = datamodule(make_cfg, tokenizer, "data=gsm8k", "data.train_rows.limit=50", NO_PROMPT_LIMIT,
                    "data.max_demo_length=200", f"data.overlong_demos={policy}", *QWEN_THINK)
    overlong = dm.counts["demos_overlong"]
    assert 0 < overlong < 50
    lengths = [len(r["demo_ids"]) for r in dm.train_rows if r["demo_ids"] is not None]
    assert max(lengths) == 200 if policy == "truncate" else max(lengths) < 200
    assert dm.demos_available == (50 if policy == "truncate" else 50 - overlong)


def test_bad_rows_error_or_skip_through_the_preset(make_cfg, tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{**GOOD, "id": f"r{i}"} for i in range(6)]
    rows[2]["answer"] = ""
    rows[4]["solution"] = "no final answer here"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["data=math_train", f"data.train_rows.path={path}", *QWEN_THINK]
    with pytest.raises(BadRowError, match=f"{path}: row 2 .*empty 'answer'"):
        datamodule(make_cfg, tokenizer, *overrides)
    dm = datamodule(make_cfg, tokenizer, *overrides, "data.train_rows.on_bad_row=skip")
    assert dm.counts["rows_skipped"] == 2 and dm.counts["train_rows"] == 4


def test_openr1_traces_follow_the_think_prompt(make_cfg, tokenizer, tmp_path):
    path = tmp_path / "openr1.parquet"
    pd.DataFrame(OPENR1_ROWS).to_parquet(path)
    dm = datamodule(make_cfg, tokenizer, "data=openr1_math", f"data.train_rows.path={path}",
                    *QWEN_THINK)
    row = dm.train_rows[1]
    assert tokenizer.decode(row["prompt_ids"]).endswith("<think>\n")
    # The trace's own "<think>\n" is dropped: the prompt opened the block already.
    assert tokenizer.decode(row["demo_ids"]) == (
        f"Add: 1+1=2.\n</think>\n\nSo \\boxed{{2}}.{tokenizer.eos_token}"
    )
