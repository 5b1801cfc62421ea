"""LUFFY's mixed groups: where each demonstration goes in the rollout batch, and what is left alone."""

import pytest
import torch

from relift_pl.rollout.base import RolloutBatch, left_pad, right_pad
from relift_pl.update.mixing import mix_demonstrations, off_policy_token_mask

PAD = 0
G = 3
# Three prompts: one with a 4-token demonstration, one without, one whose 6-token demonstration
# is longer than max_new_tokens = 5.
ROWS = [
    {"id": "a", "prompt_ids": [11, 12], "demo_ids": [21, 22, 23, 9]},
    {"id": "b", "prompt_ids": [13], "demo_ids": None},
    {"id": "c", "prompt_ids": [14, 15, 16], "demo_ids": [31, 32, 33, 34, 35, 9]},
]


def _rollout(with_logprobs: bool) -> RolloutBatch:
    # Sampled responses of 1-3 tokens (width 3 < the demonstration's 4), prompt-major.
    prompts, prompt_mask = left_pad([row["prompt_ids"] for row in ROWS], PAD)
    responses = [[100 + i] * (1 + i % 3) for i in range(len(ROWS) * G)]
    ids, mask = right_pad(responses, PAD)
    return RolloutBatch(
        prompt_ids=prompts.repeat_interleave(G, 0),
        prompt_mask=prompt_mask.repeat_interleave(G, 0),
        response_ids=ids,
        response_mask=mask,
        finish_reasons=["length"] * (len(ROWS) * G),
        logprobs=-torch.rand(ids.shape) - 0.1 if with_logprobs else None,
    )


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_demo_replaces_the_last_sample_of_its_group(with_logprobs):
    rollout = _rollout(with_logprobs)
    mixed, too_long = mix_demonstrations(rollout, ROWS, G, PAD, max_new_tokens=5)
    # Only prompt a's group gets its demonstration, in its last row (2); b has none, c's is too
    # long: both keep their G samples.
    assert mixed.off_policy.tolist() == [False, False, True] + [False] * 6
    assert too_long == [2]
    # Responses widened from 3 to 4 columns (the demonstration's length): padding, mask 0.
    assert mixed.response_ids.shape == (9, 4)
    assert mixed.response_ids[2].tolist() == [21, 22, 23, 9]
    assert mixed.response_mask[2].tolist() == [1, 1, 1, 1]
    assert mixed.finish_reasons[2] == "stop"
    # Every other row is its sample, unchanged, padded with a masked column.
    keep = [i for i in range(9) if i != 2]
    assert torch.equal(mixed.response_ids[keep, :3], rollout.response_ids[keep])
    assert torch.equal(mixed.response_mask[keep, :3], rollout.response_mask[keep])
    assert (mixed.response_ids[keep, 3] == PAD).all() and (mixed.response_mask[:, 3].sum() == 1)
    assert [mixed.finish_reasons[i] for i in keep] == ["length"] * 8
    # The demonstration follows its own prompt (the group shares it).
    assert torch.equal(mixed.prompt_ids, rollout.prompt_ids)
    assert mixed.input_ids[2].tolist() == [0, 11, 12, 21, 22, 23, 9]
    if with_logprobs:  # no engine sampled the demonstration: 0 there, sampled rows kept
        assert (mixed.logprobs[2] == 0).all()
        torch.testing.assert_close(mixed.logprobs[keep, :3], rollout.logprobs[keep])
        assert (mixed.logprobs[:, 3] == 0).all()
    else:
        assert mixed.logprobs is None


def test_every_demonstration_mixed_when_all_fit():
    mixed, too_long = mix_demonstrations(_rollout(False), ROWS, G, PAD, max_new_tokens=6)
    assert mixed.off_policy.tolist() == [False, False, True, False, False, False, False, False, True]
    assert too_long == []
    assert mixed.response_ids[8, :6].tolist() == [31, 32, 33, 34, 35, 9]


def test_token_mask_of_the_demonstration_rows():
    mixed, _ = mix_demonstrations(_rollout(False), ROWS, G, PAD, max_new_tokens=5)
    mask = off_policy_token_mask(mixed.response_mask.float(), mixed.off_policy)
    assert mask.sum() == 4 and mask[2].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert off_policy_token_mask(mixed.response_mask, None).sum() == 0


def test_row_count_must_match_the_prompts():
    with pytest.raises(ValueError, match="expected 3 prompts x 2"):
        mix_demonstrations(_rollout(False), ROWS, 2, PAD, max_new_tokens=5)
