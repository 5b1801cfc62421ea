"""Stop tokens: a Qwen2.5-Math-like base names only <|endoftext|>, its chat turns end with
<|im_end|>; sampling must stop on both and decoding must strip both."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from relift_pl.data.templates import QWEN_THINK_TEMPLATE
from relift_pl.module import ReLIFTModule
from relift_pl.rewards import MathVerifyReward
from relift_pl.rollout.base import RolloutBatch
from relift_pl.rollout.hf import HFRolloutEngine
from relift_pl.stop_tokens import apply_stop_tokens, stop_token_ids
from relift_pl.toy.tiny_qwen import corpus_texts, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus_texts(None, ("The answer is C.",)), vocab_size=400)


def test_the_template_end_of_turn_token_stops_too(tokenizer):
    eos, im_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(eos, tokenizer, QWEN_THINK_TEMPLATE) == [eos, im_end]
    # A template without ChatML turns adds nothing; the generation config's ids come first.
    assert stop_token_ids([7, eos], tokenizer, "{{ messages[0]['content'] }}") == [7, eos]
    policy = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))
    assert apply_stop_tokens(policy, tokenizer, QWEN_THINK_TEMPLATE) == [eos, im_end]
    engine = HFRolloutEngine()
    engine.bind(policy, tokenizer)
    assert engine._eos_ids() == [eos, im_end]  # what the sampling loop stops on


def test_decoding_strips_every_stop_token_so_grading_does_not_depend_on_which(tokenizer):
    eos, im_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    body = tokenizer("x</think>\nThe answer is C", add_special_tokens=False)["input_ids"]
    rows = [body + [im_end], body + [eos]]
    batch = RolloutBatch(
        prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
        response_ids=torch.tensor(rows), response_mask=torch.ones(2, len(rows[0]), dtype=torch.long),
        finish_reasons=["stop", "stop"],
    )
    module = SimpleNamespace(
        tokenizer=tokenizer, policy=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[eos, im_end]))
    )
    texts = ReLIFTModule.decode_responses(module, batch)
    assert texts[0] == texts[1] == "x</think>\nThe answer is C"
    with MathVerifyReward(num_workers=0, mode="choice") as reward:
        assert reward(texts, ["C", "C"]).rewards == [1.0, 1.0]
