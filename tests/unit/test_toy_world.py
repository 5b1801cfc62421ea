"""The toy world: rows, splits, demonstrations, the char tokenizer and the cached base."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from relift_pl.toy import base as toy_base
from relift_pl.toy.base import ensure_toy_base, sft_batch, tiny_qwen2_config
from relift_pl.toy.tokenizer import build_toy_tokenizer
from relift_pl.toy.world import LEVELS, ToyWorldConfig, _enumerate, level_pool, make_rows

torch.set_num_threads(1)

TINY_MODEL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)
STEP = re.compile(r"^(-?\d+)([+-])(\d+)=(-?\d+)$")


def fold(problem: str) -> int:
    """Left-to-right value of "a+b-c..." or "-a-b...", computed independently of the generator."""
    numbers = [int(x) for x in re.findall(r"-?\d+", problem[0] + re.sub(r"[+-]", " ", problem[1:]))]
    ops = re.findall(r"[+-]", problem[1:])
    total = numbers[0]
    for op, x in zip(ops, numbers[1:], strict=True):
        total = total + x if op == "+" else total - x
    return total


def test_rows_schema_and_determinism():
    rows = make_rows("train", LEVELS, 20, seed=3)
    assert rows == make_rows("train", LEVELS, 20, seed=3)
    assert rows != make_rows("train", LEVELS, 20, seed=4)
    assert [r["level"] for r in rows] == [lvl for lvl in LEVELS for _ in range(20)]
    for row in rows:
        assert set(row) == {"id", "problem", "answer", "demonstration", "level", "grading"}
        assert all(isinstance(row[k], str) for k in ("id", "problem", "answer", "demonstration"))
    assert len({r["id"] for r in rows}) == len(rows)
    # A level with fewer problems than asked contributes all it has, without duplicates.
    assert len(make_rows("test", [1], 10_000, seed=0)) == len(level_pool("test", 1))


def test_splits_are_disjoint_whatever_the_seed():
    for level in LEVELS:
        train, val, test = ({r["problem"] for r in level_pool(s, level)} for s in ("train", "val", "test"))
        assert train and val and test and not (train & test or train & val or val & test)
        everything = {p.text for p in _enumerate(level, ToyWorldConfig())}
        assert train | val | test == everything
        drawn = {r["problem"] for seed in range(3) for r in make_rows("val", [level], 30, seed)}
        assert drawn <= val


def test_demonstrations_are_correct_worked_solutions():
    for row in make_rows("test", LEVELS, 40, seed=0):
        body, _, boxed = row["demonstration"].partition("</think>")
        assert row["answer"] == str(fold(row["problem"]))
        assert boxed == f"\\boxed{{{row['answer']}}}"
        steps = [STEP.match(s) for s in body.split(",")]
        assert (
            len(steps)
            == len(re.findall(r"[+-]", row["problem"][1:]))
            == {1: 1, 2: 2, 3: 3, 4: 2}[row["level"]]
        )
        for match in steps:
            left, op, right, result = match.groups()
            assert int(result) == (int(left) + int(right) if op == "+" else int(left) - int(right))
        # Level 4 (-a-b-c) adds the magnitudes and boxes the negated sum.
        assert ("-" if row["level"] == 4 else "") + steps[-1].group(4) == row["answer"]
    # The hardest level's answers are all negative: a sign the warm-start never writes.
    assert all(int(r["answer"]) < 0 for r in level_pool("train", 4))


def test_one_step_short_demonstrations_box_the_partial_result():
    full, short = level_pool("train", 3)[5], level_pool("train", 3, stop_after=-1)[5]
    assert short["problem"] == full["problem"] and short["answer"] == full["answer"]
    assert full["demonstration"].startswith(short["demonstration"].split("</think>")[0] + ",")
    assert short["demonstration"].count(",") == 1 and not short["demonstration"].endswith(
        f"{{{full['answer']}}}"
    )


@pytest.mark.parametrize("loader", [PreTrainedTokenizerFast, AutoTokenizer])
def test_tokenizer_round_trip(tmp_path, loader):
    tokenizer = build_toy_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    # A model config next to it makes AutoTokenizer rebuild a Qwen2Tokenizer: both must agree.
    toy_base.Qwen2ForCausalLM(tiny_qwen2_config(len(tokenizer), **TINY_MODEL)).save_pretrained(
        tmp_path
    )
    loaded = loader.from_pretrained(tmp_path)
    assert loaded.padding_side == "left"
    assert loaded.eos_token_id == loaded.pad_token_id == 0
    assert loaded.eos_token == "<|endoftext|>"
    for token in ("<think>", "</think>", "\\boxed{"):
        assert len(loaded(token, add_special_tokens=False)["input_ids"]) == 1
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "7+5+3"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "7+5+3=<think>"
    )
    encoded = loaded.apply_chat_template(messages, add_generation_prompt=True)  # BatchEncoding
    assert loaded.decode(encoded["input_ids"]) == "7+5+3=<think>"
    for row in make_rows("test", LEVELS, 5, seed=0):
        ids = loaded(row["demonstration"], add_special_tokens=False)["input_ids"]
        assert ids == tokenizer(row["demonstration"], add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == row["demonstration"]
        # The reward reads `</think>` and `\boxed{` after skipping special tokens (EOS only).
        assert loaded.decode([*ids, 0], skip_special_tokens=True) == row["demonstration"]
    assert loaded.decode(loaded("a b\n c")["input_ids"]) == "a b\n c"


def test_sft_batch_masks_prompt_and_padding():
    tokenizer = build_toy_tokenizer()
    rows = make_rows("train", [1, 3], 1, seed=0)
    batch = sft_batch(tokenizer, rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, row in enumerate(rows):
        labels = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert tokenizer.decode(labels) == row["demonstration"] + "<|endoftext|>"
    assert batch["attention_mask"][0, 0] == 0  # the short row is left padded


def test_tiny_qwen2_config_fits_the_tokenizer():
    tokenizer = build_toy_tokenizer()
    config = tiny_qwen2_config(len(tokenizer))
    model = toy_base.Qwen2ForCausalLM(config)
    assert config.eos_token_id == config.pad_token_id == tokenizer.eos_token_id
    assert 1e5 < sum(p.numel() for p in model.parameters()) < 2e6
    logits = model(**sft_batch(tokenizer, make_rows("test", [2], 2, seed=0))).logits
    assert logits.shape[-1] == len(tokenizer)


def test_ensure_toy_base_trains_once_and_writes_atomically(tmp_path, monkeypatch):
    kwargs = dict(steps=2, batch_size=4, model_overrides=TINY_MODEL, log_every=0)
    path = ensure_toy_base(tmp_path, **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dir left behind
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached base was retrained")

    monkeypatch.setattr(toy_base, "_train_base", must_not_train)
    assert ensure_toy_base(tmp_path, **kwargs) == path
    with pytest.raises(AssertionError, match="retrained"):  # another setting, another key
        ensure_toy_base(tmp_path, **{**kwargs, "middle_fraction": 0.5})
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the failed run left nothing
