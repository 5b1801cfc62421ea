"""BenchmarkEvaluation's scoring on scripted responses: avg@k / pass@k by hand, grading modes."""

from __future__ import annotations

import json

import pytest
import torch

from callbacks.evaluation import BenchmarkEvaluation, metrics_of
from relift_pl.rewards import MathVerifyReward, RewardOutput


class ScriptedBatch(list):
    """The prompts' keys, with a ``response_mask`` like a RolloutBatch's."""

    response_mask: torch.Tensor


class ScriptedModule:
    """Answers prompt p with ``responses[p]`` (k texts); draws from the global RNG like sampling."""

    device = torch.device("cpu")

    def __init__(self, responses: dict[int, list[str]], reward_fn) -> None:
        self.responses = responses
        self.reward_fn = reward_fn
        self.calls = 0
        self.samples_asked: list[int] = []  # sampling.n of each generate call
        self.step_count, self.max_steps, self.preempted = 0, 2, False

    def generate(self, prompt_ids, sampling, purpose=None):
        self.calls += 1
        self.samples_asked.append(sampling.n)
        torch.rand(1)
        batch = ScriptedBatch(p[0] for p in prompt_ids)
        batch.n = sampling.n
        # One "token" per character of each scripted response.
        lengths = torch.tensor([len(t) for t in self.decode_responses(batch)])
        batch.response_mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
        return batch

    def decode_responses(self, batch):
        """The first n scripted responses of each prompt."""
        return [text for p in batch for text in self.responses[p][: batch.n]]


def rows(*answers: str, grading: str | None = None, first_id: int = 0):
    out = [{"id": f"q{first_id + i}", "prompt_ids": [first_id + i], "answer": a} for i, a in enumerate(answers)]
    for row in out:
        if grading:
            row["grading"] = grading
    return out


RIGHT, WRONG = "</think> so \\boxed{0.5}", "</think> \\boxed{7}"
# MATH-style: problem 0 half right, problem 1 all wrong. ARC-c with numbered options: the gold
# "2" is a choice, so "The answer is (2)" is right only when the row says grading=choice.
SCRIPT = {
    0: [RIGHT, WRONG],
    1: [WRONG, WRONG],
    10: ["</think> The answer is (2).", "</think> \\boxed{B}"],
}
EVAL_SETS = {"math": rows("\\frac{1}{2}", "3"), "arc": rows("2", grading="choice", first_id=10)}


@pytest.fixture(scope="module")
def reward():
    with MathVerifyReward(num_workers=0) as fn:
        yield fn


def test_avg_and_pass_at_k_by_hand(reward):
    evaluation = BenchmarkEvaluation(k=2, batch_prompts=1)
    scores = evaluation.evaluate(ScriptedModule(SCRIPT, reward), EVAL_SETS)
    # math: per-problem means (1/2, 0) -> avg 0.25; any-correct (1, 0) -> pass 0.5.
    # arc: (1/2) -> avg 0.5; pass 1.  val/avg = (0.25 + 0.5) / 2.
    assert metrics_of(scores) == {
        "val/math/avg@2": 0.25, "val/math/pass@2": 0.5,
        "val/arc/avg@2": 0.5, "val/arc/pass@2": 1.0,
        "val/avg": 0.375, "val/reward_timeouts": 0, "val/reward_failures": 0,
    }
    assert [(s.name, s.num_problems) for s in scores] == [("math", 2), ("arc", 1)]
    assert scores[0].per_problem == {"q0": 0.5, "q1": 0.0}
    lengths = {f"q{p}": sum(map(len, SCRIPT[p])) / 2 for p in (0, 1)}
    assert scores[0].response_tokens == lengths


def test_without_the_grading_field_the_digit_gold_is_math(reward):
    arc = {"arc": rows("2", first_id=10)}  # auto mode: a digit gold is a number, not a choice
    score = BenchmarkEvaluation(k=2).evaluate(ScriptedModule(SCRIPT, reward), arc)[0]
    assert (score.avg_at_k, score.pass_at_k) == (0.0, 0.0)


def test_problem_limits_per_set(reward):
    module = ScriptedModule(SCRIPT, reward)
    scores = BenchmarkEvaluation(k=2, max_problems={"math": 1}).evaluate(module, EVAL_SETS)
    assert [(s.name, s.num_problems, s.avg_at_k) for s in scores] == [("math", 1, 0.5), ("arc", 1, 0.5)]
    scores = BenchmarkEvaluation(k=2, max_problems=1).evaluate(module, {"math": EVAL_SETS["math"]})
    assert scores[0].num_problems == 1
    with pytest.raises(ValueError, match="names \\['maht'\\], which are not eval sets"):
        BenchmarkEvaluation(k=2, max_problems={"maht": 1}).evaluate(module, EVAL_SETS)


def test_progress_reports_every_batch(reward):
    seen = []
    BenchmarkEvaluation(k=2, batch_prompts=1).evaluate(
        ScriptedModule(SCRIPT, reward), EVAL_SETS, progress=lambda *args: seen.append(args)
    )
    assert seen == [("math", 1, 2), ("math", 2, 2), ("arc", 1, 1)]


def test_seeded_evaluation_leaves_the_training_rng_alone(reward):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    BenchmarkEvaluation(k=2, seed=0).evaluate(ScriptedModule(SCRIPT, reward), EVAL_SETS)
    assert torch.equal(torch.rand(3), expected)


def test_k_per_set(reward):
    module = ScriptedModule(SCRIPT, reward)
    evaluation = BenchmarkEvaluation(k=2, k_per_set={"math": 1}, batch_prompts=2)
    scores = evaluation.evaluate(module, EVAL_SETS)
    assert module.samples_asked == [1, 2]  # math, then arc
    # math with k=1: the first responses, RIGHT and WRONG -> avg = pass = 1/2. arc as before.
    # val/avg = (1/2 + 1/2) / 2.
    assert metrics_of(scores) == {
        "val/math/avg@1": 0.5, "val/math/pass@1": 0.5,
        "val/arc/avg@2": 0.5, "val/arc/pass@2": 1.0,
        "val/avg": 0.5, "val/reward_timeouts": 0, "val/reward_failures": 0,
    }
    assert [s.k for s in scores] == [1, 2]


def test_k_per_set_names_must_be_eval_sets(reward):
    evaluation = BenchmarkEvaluation(k=2, k_per_set={"maht": 1, "arc": 4})
    with pytest.raises(ValueError, match=r"callbacks.evaluation.k_per_set names \['maht'\], which "
                       r"are not eval sets; the eval sets are \['arc', 'math'\]"):
        evaluation.evaluate(ScriptedModule(SCRIPT, reward), EVAL_SETS)
    with pytest.raises(ValueError, match=r"callbacks.evaluation.k_per_set.arc must be >= 1"):
        BenchmarkEvaluation(k_per_set={"arc": 0})


def test_greedy_samples_once_and_counts_it_k_times(reward):
    module = ScriptedModule(SCRIPT, reward)
    scores = BenchmarkEvaluation(k=3, temperature=0.0, batch_prompts=2).evaluate(module, EVAL_SETS)
    assert module.samples_asked == [1, 1]  # engines refuse n > 1 at temperature 0
    # The one greedy response counts k=3 times: math (1, 0) -> avg 1/2, pass 1/2; arc (1) -> 1, 1.
    assert metrics_of(scores) == {
        "val/math/avg@3": 0.5, "val/math/pass@3": 0.5,
        "val/arc/avg@3": 1.0, "val/arc/pass@3": 1.0,
        "val/avg": 0.75, "val/reward_timeouts": 0, "val/reward_failures": 0,
    }
    assert scores[0].per_problem == {"q0": 1.0, "q1": 0.0}
    assert scores[0].response_tokens == {"q0": len(RIGHT), "q1": len(WRONG)}


class TroubledReward:
    """Scores every response 0 and reports 1 timeout and 2 failures per call."""

    def __call__(self, responses, golds, modes=None):
        return RewardOutput([0.0] * len(responses), timeouts=1, failures=2)


def test_grading_timeouts_and_failures_are_counted_per_set_and_summed():
    evaluation = BenchmarkEvaluation(k=2, batch_prompts=1)
    scores = evaluation.evaluate(ScriptedModule(SCRIPT, TroubledReward()), EVAL_SETS)
    # One reward call per prompt: math has 2 prompts, arc 1.
    assert [(s.name, s.timeouts, s.failures) for s in scores] == [("math", 2, 4), ("arc", 1, 2)]
    metrics = metrics_of(scores)
    assert (metrics["val/reward_timeouts"], metrics["val/reward_failures"]) == (3, 6)


@pytest.mark.parametrize("seed", [None, 1.5, True])
def test_the_evaluation_seed_must_be_an_integer(seed):
    # No "global streams" option: an evaluation redone by a resume would draw from the fresh
    # process's streams and leave training on another path than the run that did not stop.
    with pytest.raises(ValueError, match=r"callbacks.evaluation.seed must be an integer, got"):
        BenchmarkEvaluation(k=2, seed=seed)


def test_per_problem_lines_after_the_resumed_step_are_dropped(tmp_path):
    from callbacks.evaluation import keep_lines_to

    path = tmp_path / "per_problem.jsonl"
    lines = [json.dumps({"step": s, "set": "math"}) + "\n" for s in (0, 2, 4)]
    path.write_text("".join(lines) + '{"step": 6, "se')  # the last append, cut by a kill
    keep_lines_to(path, 2)
    assert path.read_text() == "".join(lines[:2])
    keep_lines_to(path, -1)  # a fresh run in a used folder
    assert path.read_text() == ""
