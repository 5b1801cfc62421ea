"""The second toy world: rows, splits, both demonstration styles, the digit tasks, the base's key."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from relift_pl.toy import base as toy_base
from relift_pl.toy import world, world2
from relift_pl.toy.base import ensure_toy_base
from relift_pl.toy.tokenizer import build_toy_tokenizer

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)


def test_rows_schema_determinism_and_levels():
    rows = world2.make_rows("train", world2.LEVELS, 20, seed=3)
    assert rows == world2.make_rows("train", world2.LEVELS, 20, seed=3)
    assert [r["level"] for r in rows] == [lvl for lvl in world2.LEVELS for _ in range(20)]
    for row in rows:
        assert set(row) == {"id", "problem", "answer", "demonstration", "level", "grading"}
    assert len({r["id"] for r in rows}) == len(rows)


def test_levels_1_to_3_are_the_first_worlds_questions():
    for split in ("val", "test"):
        for level in (1, 2, 3):
            ours = [r["problem"] for r in world2.make_rows(split, [level], 64, seed=0)]
            theirs = [r["problem"] for r in world.make_rows(split, [level], 64, seed=0)]
            assert ours == theirs


def test_splits_are_disjoint_and_cover_level_4():
    train, val, test = ({r["problem"] for r in world2.level_pool(s, 4)} for s in ("train", "val", "test"))
    assert train and val and test and not (train & val or train & test or val & test)
    assert len(train | val | test) == 9 * 8 * 7 * 6  # 4 distinct digits 1-9, ordered


def test_level_4_is_backwards_then_without_the_first_and_no_copy_hits_it():
    for row in world2.level_pool("val", 4):
        digits = row["problem"][1:]
        assert row["problem"][0] == "R" and len(set(digits)) == 4 and "0" not in digits
        back = digits[::-1]
        assert row["answer"] == back[1:] and row["answer"] not in digits
        assert row["demonstration"] == (
            f"the digits are {','.join(digits)}, backwards {','.join(back)}, without the first "
            f"{','.join(back[1:])}, so the answer is {back[1:]}.</think>\\boxed{{{back[1:]}}}")
    assert world2.answer_of("R4831", 4) == "384"


def test_the_warm_start_chains_every_pair_of_steps_but_level_4s():
    pairs = {steps for letter, steps in world2.TASKS.items() if len(steps) == 2 and letter != "R"}
    every = {(a, b) for a in world2.STEPS for b in world2.STEPS if a != b}
    assert every - pairs == {world2.TASKS["R"]} == {("backwards", "without the first")}
    assert not set(world2.TASKS) & set(world2.COPY_LETTERS)


def test_verbose_and_terse_arithmetic():
    assert world2.demonstration("12+5", 1) == "12+5=17, so the answer is 17.</think>\\boxed{17}"
    assert world2.demonstration("12+5+7", 2, "terse") == "12+5=17,17+7=24</think>\\boxed{24}"
    assert world2.demonstration("12+5+7+3", 3) == (
        "12+5=17, then 17+7=24, then 24+3=27, so the answer is 27.</think>\\boxed{27}")
    # The warm-start's terse rows are the first world's demonstrations, one-step-short ones too.
    for stop in (None, -1):
        ours = world2.level_pool("train", 3, style="terse", stop_after=stop)[:50]
        theirs = world.level_pool("train", 3, stop_after=stop)[:50]
        assert [r["demonstration"] for r in ours] == [r["demonstration"] for r in theirs]
    with pytest.raises(ValueError):
        world2.demonstration("R1234", 4, "terse")
    with pytest.raises(ValueError):
        world2.demonstration("1+2", 1, "verbose", stop_after=-1)


def test_every_demonstration_is_correct_and_fits_the_response_budget():
    tokenizer = build_toy_tokenizer()
    for level in world2.LEVELS:
        for row in world2.level_pool("train", level)[:300]:
            boxed = re.findall(r"\\boxed\{([^{}]*)\}", row["demonstration"].split("</think>")[-1])
            assert boxed == [row["answer"]]
            if level < 4:
                assert int(row["answer"]) == sum(int(x) for x in row["problem"].split("+"))
            assert len(tokenizer(row["demonstration"])["input_ids"]) + 1 <= 96  # + EOS
    lengths = {lvl: [len(tokenizer(r["demonstration"])["input_ids"]) for r in world2.level_pool("train", lvl)]
               for lvl in (1, 2, 3)}
    terse = {lvl: [len(tokenizer(r["demonstration"])["input_ids"])
                   for r in world2.level_pool("train", lvl, style="terse")] for lvl in (1, 2, 3)}
    ratio = sum(map(sum, lengths.values())) / sum(map(sum, terse.values()))
    assert 2.0 < ratio < 3.0  # the teacher's style: about 2.4x the base's tokens


def test_digit_tasks_of_the_warm_start():
    rng = random.Random(0)
    rows = [world2.draw_pretraining_row(rng) for _ in range(2000)]
    letters = {r["problem"][0] for r in rows}
    assert "R" not in letters and set("BDTKMPWF") <= letters and len(letters) > 20
    back, drop, rotate = (lambda d: d[::-1]), (lambda d: d[1:]), (lambda d: d[1:] + d[0])
    by_hand = {"B": back, "D": drop, "T": rotate, "K": lambda d: rotate(back(d)),
               "M": lambda d: back(drop(d)), "P": lambda d: back(rotate(d)),
               "W": lambda d: rotate(drop(d)), "F": lambda d: drop(rotate(d))}
    for r in rows:
        letter, digits = r["problem"][0], r["problem"][1:]
        expected = by_hand.get(letter, lambda d: d)(digits)
        assert r["answer"] == expected and 3 <= len(digits) <= 5 and len(set(digits)) == len(digits)
        assert r["demonstration"].endswith(f"so the answer is {expected}.</think>\\boxed{{{expected}}}")
    # Two steps are written out one after the other: M4831 drops, then reverses the rest.
    assert world2._listing("M", "4831") == ("the digits are 4,8,3,1, without the first 8,3,1, backwards "
                                            "1,3,8, so the answer is 138.</think>\\boxed{138}")
    copies = sum(r["problem"][0] not in "BDTKMPWF" for r in rows) / len(rows)
    assert 0.24 < copies < 0.34  # weight 2 of 7


def test_task_fraction_keeps_the_first_worlds_key_and_mixes_digit_tasks(tmp_path, monkeypatch):
    seen = []
    real_batch = toy_base.sft_batch

    def spy(tokenizer, rows):
        seen.extend(r["problem"] for r in rows)
        return real_batch(tokenizer, rows)

    monkeypatch.setattr(toy_base, "sft_batch", spy)
    kwargs = dict(steps=3, batch_size=8, model_overrides=TINY_MODEL, log_every=0)
    plain = ensure_toy_base(tmp_path, **kwargs)
    assert not any(p[0].isalpha() for p in seen)
    assert "task_fraction" not in json.loads((plain / toy_base.METADATA_FILE).read_text())
    seen.clear()
    mixed = ensure_toy_base(tmp_path, task_fraction=0.5, **kwargs)
    assert mixed != plain and any(p[0].isalpha() for p in seen)
    assert json.loads((mixed / toy_base.METADATA_FILE).read_text())["task_fraction"] == 0.5


@pytest.mark.parametrize("algorithm", ["grpo", "sft", "sft_then_rl", "luffy", "relift", "relift_every_step",
                                       "relift_uniform", "relift_random_buffer", "rl_with_sft_loss"])
def test_the_study_configs_pass_the_config_checks(algorithm):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import relift_pl.train  # noqa: F401  (the relift_root resolver)
    from relift_pl.validation import check_config

    GlobalHydra.instance().clear()
    conf = str(Path(__file__).resolve().parents[2] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=toy2_paper", f"algorithm={algorithm}",
                                           "paths.output_dir=/tmp/relift-unused"])
    GlobalHydra.instance().clear()
    check_config(cfg, training=True)
    assert cfg.data.train_rows._target_ == "relift_pl.toy.world2.make_rows"
    assert cfg.model.build.task_fraction == 0.3 and cfg.rollout.sampling.max_new_tokens == 96
    assert cfg.data.max_demo_length == 96 and cfg.max_steps == 150
