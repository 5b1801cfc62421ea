"""Teacher-forced demonstration token probabilities (relift_pl.study.key_tokens)."""

import math
from types import SimpleNamespace

import pytest
import torch

from relift_pl.study.key_tokens import demo_token_probs, summary
from relift_pl.toy import world2
from relift_pl.toy.tokenizer import build_toy_tokenizer


class Uniform(torch.nn.Module):
    """Every token equally likely, except ``boost`` at the positions whose input is ``after``."""

    def __init__(self, vocab: int, after: int | None = None, boost: int | None = None) -> None:
        super().__init__()
        self.vocab, self.after, self.boost = vocab, after, boost

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.after is not None:
            logits[..., self.boost] += (input_ids == self.after).float() * 10
        return SimpleNamespace(logits=logits)


def test_uniform_model_gives_one_over_the_vocabulary_to_every_token():
    tokenizer = build_toy_tokenizer()
    rows = world2.level_pool("val", 4)[:3]
    probs = demo_token_probs(Uniform(len(tokenizer)), tokenizer, rows, batch_size=2)
    n_tokens = [len(tokenizer(r["demonstration"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    assert [len(p) for p in probs] == n_tokens  # + EOS
    assert all(p == pytest.approx(1 / len(tokenizer)) for row in probs for p in row)
    s = summary(probs)
    assert s["demonstrations"] == 3 and s["lowest_median"] == pytest.approx(1 / len(tokenizer))
    assert math.log(s["whole_max"]) == pytest.approx(-min(n_tokens) * math.log(len(tokenizer)), rel=1e-6)


def test_probabilities_are_read_at_the_right_positions_and_sorted():
    # Boost the token that follows every ",": those positions' labels become likely (when the
    # label is the boosted token) and the ascending order puts them last.
    tokenizer = build_toy_tokenizer()
    comma = tokenizer(",", add_special_tokens=False)["input_ids"][0]
    space = tokenizer(" ", add_special_tokens=False)["input_ids"][0]
    row = {"problem": "R1234", "demonstration": "1, 2, 3"}
    probs = demo_token_probs(Uniform(len(tokenizer), after=comma, boost=space), tokenizer, [row])[0]
    likely = math.exp(10) / (math.exp(10) + len(tokenizer) - 1)
    assert probs == sorted(probs) and probs[-2:] == pytest.approx([likely, likely])  # two ", " pairs
