"""BenchmarkEvaluation's scoring on scripted responses: avg@k / pass@k by hand, grading modes."""

from __future__ import annotations

import pytest
import torch

from callbacks.evaluation import BenchmarkEvaluation, metrics_of
from relift_pl.rewards import MathVerifyReward


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

    def generate(self, prompt_ids, sampling):
        self.calls += 1
        torch.rand(1)
        batch = ScriptedBatch(p[0] for p in prompt_ids)
        # One "token" per character of each scripted response.
        lengths = torch.tensor([len(t) for p in batch for t in self.responses[p]])
        batch.response_mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
        return batch

    def decode_responses(self, batch):
        return [text for p in batch for text in self.responses[p]]


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
        "val/avg": 0.375,
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
