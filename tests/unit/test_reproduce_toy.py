"""The study's aggregation (relift_pl/study/, scripts/reproduce_toy.py), each formula pinned by
hand-computed values on synthetic runs: a changed formula (a pooled average, step-0 tokens, one
seed's demos, a population std, an extra method in a category) must fail here."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from relift_pl.study import stats as st
from relift_pl.study import tables
from relift_pl.study.runs import Job

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "reproduce_toy.py"
spec = importlib.util.spec_from_file_location("reproduce_toy", SCRIPT)
rt = importlib.util.module_from_spec(spec)
sys.modules["reproduce_toy"] = rt  # dataclasses look their module up
spec.loader.exec_module(rt)
LEVELS = st.LEVELS


def evaluation(correct: dict[str, dict[str, float]], tokens: dict[str, dict[str, float]] | None = None) -> dict:
    tokens = tokens or {s: {q: 10.0 for q in qs} for s, qs in correct.items()}
    return {s: {"correct": correct[s], "tokens": tokens[s]} for s in correct}


def levels(l1, l2, l3, l4) -> dict[str, dict[str, float]]:
    """Per level, questions named <level>-<i> with the given shares."""
    return {s: {f"{s}-{i}": v for i, v in enumerate(vals)} for s, vals in zip(LEVELS, (l1, l2, l3, l4))}


def run(final: dict, base: dict | None = None, *, summary: dict | None = None, metrics: dict | None = None,
        config: dict | None = None, final_tokens: dict | None = None) -> dict:
    base = base or {s: {q: 0.0 for q in qs} for s, qs in final.items()}
    return {
        "summary": {"demos_used": 0, "demos_available": 100, "rl_steps": 150, "sft_steps": 0} | (summary or {}),
        "evals": {0: evaluation(base), 150: evaluation(final, final_tokens)},
        "metrics": metrics or {},
        "config": config or {},
    }


# -- accuracy, avg, tokens --------------------------------------------------------------------------
def test_avg_is_the_mean_of_level_means_not_pooled():
    # level1 has 1 question (1.0), the others 3 questions at 0: pooled 1/10 = 0.1, level mean 0.25.
    acc = st.accuracy(evaluation(levels([1.0], [0, 0, 0], [0, 0, 0], [0, 0, 0])))
    assert acc["level1"] == 1.0 and acc["avg"] == pytest.approx(0.25)


def test_response_tokens_are_read_at_the_final_evaluation():
    final = levels([1.0], [1.0], [1.0], [0.0])
    tokens = {s: {q: t for q in qs} for (s, qs), t in zip(final.items(), (10.0, 20.0, 30.0, 60.0))}
    r = run(final, final_tokens=tokens)  # step 0 has 10 tokens everywhere
    tok = st.response_tokens(st.final_eval(r))
    assert tok["level4"] == 60.0 and tok["avg"] == pytest.approx(30.0)  # (10 + 20 + 30 + 60) / 4
    assert st.response_tokens(r["evals"][0])["avg"] == 10.0


def test_mean_std_uses_the_sample_std():
    assert st.mean_std([1.0, 3.0]) == "2.0 ± 1.4"  # sqrt(2) with n - 1; population std would be 1.0
    assert st.mean_std([5.0]) == "5.0 ± 0.0"


# -- the paired difference --------------------------------------------------------------------------
def test_paired_interval_by_hand():
    # diffs 1, 3, 5: mean 3, sample sd 2, n 3, t(0.975, 2) = 4.303 -> half 4.303 * 2 / sqrt(3) = 4.9687
    mean, lo, hi, n = st.paired_interval({0: 10.0, 1: 12.0, 2: 14.0, 7: 99.0}, {0: 9.0, 1: 9.0, 2: 9.0})
    assert n == 3 and mean == pytest.approx(3.0)
    assert lo == pytest.approx(3.0 - 4.303 * 2 / math.sqrt(3)) and hi == pytest.approx(3.0 + 4.9687, abs=1e-3)


def test_paired_interval_pairs_by_seed_not_by_position():
    # Same values, other seed order: paired by seed the difference is constant (+1, sd 0).
    mean, lo, hi, n = st.paired_interval({0: 1.0, 1: 5.0}, {1: 4.0, 0: 0.0})
    assert (mean, lo, hi, n) == (1.0, 1.0, 1.0, 2)


def test_t_quantiles():
    assert st.T975[2] == 4.303 and st.T975[4] == 2.776  # n = 3 (ablations) and n = 5 (main methods)


def test_table_columns_by_hand():
    base = evaluation(levels([1.0], [1.0], [0.0], [0.0]))
    # ReLIFT seeds 0, 1: avg 50 and 75; GRPO seeds 0, 1: avg 50 and 50 -> paired diffs 0, 25
    relift = {0: run(levels([1.0], [1.0], [0.0], [0.0]), summary={"demos_used": 10, "sft_steps": 3}),
              1: run(levels([1.0], [1.0], [1.0], [0.0]), summary={"demos_used": 30, "sft_steps": 4})}
    grpo = {0: run(levels([1.0], [1.0], [0.0], [0.0])), 1: run(levels([1.0], [1.0], [0.0], [0.0]))}
    lines = tables.table({"grpo": grpo, "relift": relift}, 16, base).splitlines()
    assert lines[2].startswith("| base | - | 100.0 | 100.0 | 0.0 | 0.0 | 50.0 |")
    grpo_cells = [c.strip() for c in lines[3].split("|")[1:-1]]
    relift_cells = [c.strip() for c in lines[4].split("|")[1:-1]]
    assert grpo_cells[0] == "grpo" and grpo_cells[1] == "2" and grpo_cells[6] == "50.0 ± 0.0"
    # diffs 0 and 25: mean 12.5, sd 17.68, half = 12.706 * 17.68 / sqrt(2) = 158.8
    assert grpo_cells[7] == "+12.5 [-146.3, +171.3]"
    assert relift_cells[4] == "50.0 ± 70.7" and relift_cells[6] == "62.5 ± 17.7" and relift_cells[7] == "-"
    assert relift_cells[8] == "20.0 ± 14.1"  # demos used: 10% and 30% of 100, mean over seeds
    assert relift_cells[9] == str(round((3 + 4) / 2 * 16))  # row-updates: sft steps x M, mean
    assert relift_cells[11] == "150 / 3-4"


# -- demos used, row-updates, compute ---------------------------------------------------------------
def test_demos_used_pct_is_distinct_rows_over_available():
    assert st.demos_used_pct(run(levels([1], [1], [1], [1]), summary={"demos_used": 25, "demos_available": 200})) == 12.5


def test_row_updates_per_schedule():
    final = levels([1], [1], [1], [1])
    buffered = run(final, summary={"sft_steps": 5}, config={"algorithm": {"sft_enabled": True, "sft_schedule": "buffer"}})
    assert st.row_updates(buffered, 16) == 5 * 16
    # every_step: buffer after steps 1-3 = 0, 0, 2; hardest pushed 3, 4, 2 (rate x 16); SFT at steps 1 and 2
    # -> popped at 1: 0 + 3 - 0 = 3; at 2: 0 + 4 - 0 = 4; step 3 no SFT (counter unchanged).
    metrics = {1: {"buffer/size": 0, "train/solve_none_rate": 3 / 16, "train/sft_step": 1},
               2: {"buffer/size": 0, "train/solve_none_rate": 4 / 16, "train/sft_step": 2},
               3: {"buffer/size": 2, "train/solve_none_rate": 2 / 16, "train/sft_step": 2}}
    every = run(final, summary={"sft_steps": 2}, metrics=metrics,
                config={"algorithm": {"sft_enabled": True, "sft_schedule": "every_step"}})
    assert st.row_updates(every, 16) == 7
    luffy = run(final, metrics={1: {"luffy/demos_mixed": 16.0}, 2: {"luffy/demos_mixed": 15.0}},
                config={"algorithm": {"sft_enabled": False, "mix_demos": True}})
    assert st.row_updates(luffy, 16) == 31
    loss = run(final, summary={"rl_steps": 150}, config={"algorithm": {"sft_enabled": False, "sft_loss_coef": 1.0}})
    assert st.row_updates(loss, 16) == 150 * 16
    warmup = run(final, summary={"rl_steps": 75, "sft_steps": 75},
                 config={"algorithm": {"sft_enabled": False, "sft_warmup_steps": 75}})
    assert st.row_updates(warmup, 16) == 75 * 16
    assert st.row_updates(run(final, config={"algorithm": {"sft_enabled": False}}), 16) == 0  # GRPO


def test_trained_tokens_sum_every_step():
    r = run(levels([1], [1], [1], [1]), metrics={1: {"perf/trained_tokens": 100.0}, 2: {"perf/trained_tokens": 50.0},
                                              3: {"perf/trained_tokens": 7.0, "rl/sft_demo_tokens": 3.0}})
    assert st.trained_tokens(r) == 157.0  # the module's count already holds the SFT-loss demos


# -- the capability map ------------------------------------------------------------------------------
def test_capability_categories_over_every_method_shown():
    base = {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0, "e": 1.0}
    finals = {
        "grpo": {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.0, "e": 1.0},
        "relift": {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0, "e": 0.25},
        "sft_then_rl": {"a": 1.0, "b": 0.0, "c": 0.75, "d": 0.25, "e": 1.0},  # c only here
    }
    category, counts = st.capability(base, finals)
    assert category == {"a": "solved by the base", "b": "learned by GRPO",
                        "c": "learned only by methods with demonstrations",
                        "d": "learned by no method shown", "e": "solved by the base"}
    assert counts["relift"] == {"solved": 1, "learned": 0, "lost": 1}  # e lost
    assert counts["sft_then_rl"] == {"solved": 3, "learned": 1, "lost": 0}
    # Leaving sft_then_rl out of the drawn methods makes c "learned by no method shown".
    assert st.capability(base, {m: f for m, f in finals.items() if m != "sft_then_rl"})[0]["c"] == \
        "learned by no method shown"


def test_capability_averages_seeds_before_the_threshold():
    r1 = run(levels([1.0], [0.0], [0.0], [0.0]))
    r2 = run(levels([0.0], [0.0], [0.0], [0.5]))
    shares = st.mean_shares({0: r1, 1: r2})
    assert shares["level1-0"] == 0.5 and shares["level4-0"] == 0.25  # 0.5 counts as solved, 0.25 not
    category, _ = st.capability({"level1-0": 0.0, "level4-0": 0.0}, {"relift": shares})
    assert category == {"level1-0": "learned only by methods with demonstrations",
                        "level4-0": "learned by no method shown"}


# -- the study's definitions ------------------------------------------------------------------------
def test_every_method_has_a_config_and_enough_seeds():
    for name, overrides in rt.METHODS.items():
        algorithm = overrides[0].split("=")[1]
        assert (SCRIPT.parents[1] / "conf" / "algorithm" / f"{algorithm}.yaml").exists()
        assert len(rt.STUDY_SEEDS[name]) >= (5 if name in rt.MAIN else 3)
    assert set(rt.MAIN) == {"grpo", "sft", "sft_then_rl", "luffy", "relift"}
    assert not set(rt.STUDY_SEEDS["relift"]) & set(rt.TUNE_SEEDS + rt.PREMISE_SEEDS)
    assert not set(rt.ROBUSTNESS_SEEDS) & set(rt.TUNE_SEEDS + rt.PREMISE_SEEDS)
    assert set(rt.ROBUSTNESS_BASES) <= set(rt.BASES) and "shipped" not in rt.ROBUSTNESS_BASES


def test_sft_is_sft_then_rl_without_the_rl_half():
    """Identical computations stay identical: SFT and SFT-then-RL differ only in the warm-up length."""
    sft = Job(Path("/x"), "toy2_paper", rt.METHODS["sft"]).expanded()
    then = Job(Path("/x"), "toy2_paper", rt.METHODS["sft_then_rl"]).expanded()
    assert [o for o in sft if "warmup" not in o] == [o for o in then if "warmup" not in o]
    assert "algorithm.sft_warmup_steps=150" in sft and "algorithm.sft_warmup_steps=75" in then


@pytest.mark.parametrize("split", ["val", "test"])
def test_runs_are_scored_on_their_split(split):
    rt.ARGS = rt.argparse.Namespace(runs_dir="/tmp/x", overrides=["num_threads=1"])
    cmd = rt.job("study", "avx2", "sft_then_rl", 1, rt.METHODS["sft_then_rl"], split).command()
    assert "algorithm.sft_warmup_steps=75" in cmd and "seed=1" in cmd and "logger=csv" in cmd
    assert ("data.eval_sets.level4.split=val" in cmd) == (split == "val")
    # The base's overrides come first (a method's own win), the study's extra ones last.
    assert cmd.index("model.build.rebuild=true") < cmd.index("algorithm=sft_then_rl") < cmd.index("num_threads=1")
    assert "hydra.run.dir=/tmp/x/study/avx2/sft_then_rl/seed1" in cmd


def test_edge_extension_of_the_tuning_grid():
    assert rt.edge_value(["1e-4", "2e-4", "4e-4"], "4e-4") == "1.2e-3"
    assert rt.edge_value(["3e-5", "1e-4", "3e-4"], "3e-5") == "1e-5"
    assert rt.edge_value(["1e-4", "3e-4", "1e-3"], "3e-4") is None


# -- the premise on every base, the robustness table ------------------------------------------------
def _curve(level4_by_step: dict[int, float], easy: float = 1.0) -> dict:
    """A run whose evaluations hold one question per level: levels 1-3 at ``easy``, level 4 as given."""
    return {"summary": {}, "metrics": {}, "evals": {
        t: evaluation(levels([easy], [easy], [easy], [v])) for t, v in level4_by_step.items()}}


def test_bases_table_bars_by_hand():
    keys = {"lowest_median": 1e-7, "lowest_max": 2e-7, "second_median": 3e-7, "second_max": 4e-7}
    good = {"base_eval": evaluation(levels([1], [1], [1], [0.0, 0.0])), "base_k": 32, "key_tokens": keys,
            "runs": {"grpo": {100: _curve({0: 0.0, 25: 0.0, 150: 0.0}), 101: _curve({0: 0.0, 150: 0.01})},
                     "luffy": {100: _curve({0: 0.0, 150: 0.5})}, "sft_level4": {100: _curve({0: 0.0, 40: 0.75})}}}
    # P1 fails on one seed's highest evaluation (seed 101, step 25: 2% > 1%; its last is 0, the
    # other seed never leaves 0); P3 on level 1-3 dropping 6 points (1.0 -> 0.94); P2 on 0.25 < 50%.
    bad = {**good, "runs": {"grpo": {100: _curve({0: 0.0, 150: 0.0}), 101: _curve({0: 0.0, 25: 0.02, 150: 0.0}),
                                     102: _curve({0: 0.0, 150: 0.0})},
                            "luffy": good["runs"]["luffy"],
                            "sft_level4": {100: {**_curve({0: 0.0}), "evals": {0: _curve({0: 0.0})["evals"][0],
                                           40: evaluation(levels([0.94], [1], [1], [0.25]))}}}}}
    lines = tables.bases_table({"a": good, "b": bad}).splitlines()
    a = [c.strip() for c in lines[2].split("|")[1:-1]]
    b = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert a[1] == "0 / 64" and a[2] == "1.0e-07 / 2.0e-07" and a[3] == "3.0e-07 / 4.0e-07"
    assert a[4] == "0.0 / 1.0%" and a[5] == "50.0% (50.0%)"
    assert a[6] == "75.0%" and a[8:] == ["yes", "yes", "yes"]
    assert b[4] == "0.0 / 2.0 / 0.0%" and b[7] == "-6.0 / +0.0 / +0.0" and b[8:] == ["NO", "NO", "NO"]


def _timed(level4_by_step: dict[int, float], easy_tokens: float, easy: float = 1.0) -> dict:
    """:func:`_curve` whose levels 1-3 answer in ``easy_tokens`` tokens after step 0 (10 at 0)."""
    r = _curve(level4_by_step, easy)
    for step, e in r["evals"].items():
        for s in LEVELS[:3]:
            e[s]["tokens"] = {q: (easy_tokens if step else 10.0) for q in e[s]["correct"]}
    return r


def test_premise_table_bars_by_hand():
    base_eval = evaluation(levels([1], [1], [1], [0.0, 1 / 32]))  # 1 correct of 2 x 32 samples
    runs = {"grpo": {100: _timed({0: 0.0, 25: 0.01, 150: 0.0}, 10.0), 101: _timed({0: 0.0, 150: 0.0}, 12.0)},
            "sft_level4": {100: _timed({0: 0.0, 40: 0.6}, 14.0, easy=0.97),
                           101: _timed({0: 0.0, 40: 0.5}, 16.0, easy=0.97)},
            "sft_all": {100: _timed({0: 0.0, 150: 1.0}, 14.0), 101: _timed({0: 0.0, 150: 1.0}, 16.0)}}
    lines = tables.premise_table(runs, base_eval, 32, 16).splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in lines[2:6]}
    # P1: 1 of 64 samples = 1.6% > 0.1% -> NO (GRPO's highest, 1.0%, alone would pass).
    assert rows["P1"][3].startswith("base: 1 correct of 64 samples (2 level-4 validation questions x 32")
    assert "level 4 0.0 ± 0.0% at step 150, highest at any evaluation 1.0%" in rows["P1"][3]
    assert rows["P1"][4] == "NO"
    # P2: mean of 60 and 50 = 55 >= 50; P3: each easy level 100 -> 97 (-3 >= -5).
    assert "level 4: base 0.0% -> 55.0 ± 7.1% (2 seeds)" in rows["P2"][3] and rows["P2"][4] == "yes"
    assert "level1: 100.0 -> 97.0 ± 0.0 (-3.0)" in rows["P3"][3] and rows["P3"][4] == "yes"
    # P4: SFT on all answers levels 1-3 in 15 tokens (mean of 14, 16) vs the base's 10: 1.50x.
    assert "base 10.0; SFT on all 15.0 ± 1.4 (1.50x); SFT on level 4 only 15.0 ± 1.4; GRPO 11.0 ± 1.4" \
        in rows["P4"][3] and rows["P4"][4] == "yes"


def test_key_token_table_by_hand():
    def keys(low, second):
        return {"lowest_median": low, "second_median": second}

    curves = {"a": {"grpo": {50: keys(2e-7, 3e-6), 25: keys(1e-7, 2e-6)}}}
    lines = tables.key_token_table({"a": keys(1e-8, 1e-7)}, curves).splitlines()
    assert lines[0] == "| base | run | step 0 (base) | 25 | 50 |"
    assert lines[2] == "| a | grpo | 1.0e-08 / 1.0e-07 | 1.0e-07 / 2.0e-06 | 2.0e-07 / 3.0e-06 |"


def test_robustness_table_spreads_by_hand():
    def method(*avgs):  # one seed per value; all four levels at the value
        return {s: run(levels([v], [v], [v], [v])) for s, v in enumerate(avgs)}

    by_base = {"x": {"relift": method(0.9, 0.8), "grpo": method(0.5, 0.6)},
               "y": {"relift": method(0.7, 0.7), "grpo": method(0.5, 0.5)}}
    lines = tables.robustness_table(by_base).splitlines()
    x = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert x[:3] == ["x", "85.0 ± 7.1", "55.0 ± 7.1"]
    assert x[3] == "+30.0 [-97.1, +157.1]"  # diffs 40, 20: mean 30, sd 14.14, t(1) = 12.706 / sqrt 2
    spread = {row.split("|")[1].strip(): row for row in lines[5:]}
    # relift: base means 85, 70 -> std 10.6; within-base stds 7.07 and 0 -> mean 3.5.
    assert "| relift | 10.6 | 3.5 |" in lines and "| grpo | 3.5 | 3.5 |" in lines
    assert set(spread) >= {"relift", "grpo"}


def test_luffy_table_reads_each_evaluations_step():
    r = _curve({0: 0.0, 25: 0.5})
    r["metrics"] = {1: {"luffy/min_token_logprob": math.log(1e-7), "luffy/min_token_weight": 1e-6,
                        "luffy/off_policy_prob": 0.8},
                    25: {"luffy/min_token_logprob": math.log(1e-2), "luffy/min_token_weight": 0.08,
                         "luffy/off_policy_prob": 0.9}}
    lines = tables.luffy_table({"a": r}).splitlines()
    assert lines[2] == "| a | 0 | 0.0 | -7.00 | 1.0e-06 | 0.800 |"  # step 0 reads step 1's metrics
    assert lines[3] == "| a | 25 | 50.0 | -2.00 | 8.0e-02 | 0.900 |"


def test_the_study_runs_the_tuning_grids_choices(tmp_path):
    grid = tmp_path / "grid.md"
    rows = [f"| {m} | {s.split('=')[0]} | **{s.split('=')[1]}** | 2 |" for m, s in rt.CHOSEN.items()]
    rows += ["| grpo | algorithm.rl_optimizer.lr | 9e-9 | 2 |"]  # a losing value: not a choice
    interval = rt.UNIFORM_INTERVAL.split("=")[1]
    grid.write_text("\n".join([*rows, f"... -> relift_uniform interval round(150 / 7.5) = {interval}."]))
    assert rt.grid_winners(grid.read_text()) == rt.CHOSEN | {"uniform": rt.UNIFORM_INTERVAL}
    rt.check_settings(grid)
    grid.write_text(grid.read_text().replace(f"= {interval}.", "= 999."))
    with pytest.raises(SystemExit, match="uniform: algorithm.sft_interval=.* here, algorithm.sft_interval=999 there"):
        rt.check_settings(grid)
    with pytest.raises(SystemExit, match="missing: run --stage tune first"):
        rt.check_settings(tmp_path / "absent.md")
