"""The sampling loop (`rollout.engine.decode=loop`) samples what Hugging Face `generate` samples.

Same seed, same model: the same tokens, masks and finish reasons, for every sampling setting the
engine takes; its in-place cache layer returns what transformers' DynamicLayer returns.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicLayer

from relift_pl.rollout.base import SamplingParams
from relift_pl.rollout.decode import InPlaceLayer, sample_responses
from relift_pl.rollout.hf import HFRolloutEngine

PAD = 0
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # make the EOS likely, so responses end at different lengths
        model.lm_head.bias = None
        model.lm_head.weight[PAD] *= 0.0
        model.lm_head.weight[1] *= 0.0
    model.generation_config = GenerationConfig(eos_token_id=PAD, pad_token_id=PAD)
    return model.train()


def _engine(policy, decode: str, share: bool = True) -> HFRolloutEngine:
    engine = HFRolloutEngine(decode=decode, share_prompt_prefill=share)
    engine.bind(policy, SimpleNamespace(pad_token_id=PAD, eos_token_id=PAD))
    return engine


SETTINGS = {
    "plain": SamplingParams(n=4, max_new_tokens=24),
    "all_stop": SamplingParams(n=4, max_new_tokens=120),
    "min_new_tokens": SamplingParams(n=4, max_new_tokens=12, min_new_tokens=7),
    "warpers": SamplingParams(n=3, temperature=0.7, top_k=6, top_p=0.9, max_new_tokens=20),
    "top_p": SamplingParams(n=3, temperature=1.3, top_p=0.8, max_new_tokens=20),
    "greedy": SamplingParams(n=1, temperature=0.0, max_new_tokens=10, min_new_tokens=3),
    "one_sample": SamplingParams(n=1, max_new_tokens=16),
}


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_loop_samples_what_generate_samples(policy, name, share):
    sampling = SETTINGS[name]
    reference = _engine(policy, "generate", share)
    torch.manual_seed(11)
    expected = reference.generate(PROMPTS, sampling)
    loop = _engine(policy, "loop", share)
    policy.generate = lambda *a, **k: pytest.fail("decode=loop called generate")
    try:
        torch.manual_seed(11)
        got = loop.generate(PROMPTS, sampling)
    finally:
        del policy.generate
    assert policy.training  # train mode restored
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    assert got.finish_reasons == expected.finish_reasons
    if name == "plain":  # the case covers rows that stop early and rows that run to the limit
        assert {"stop", "length"} <= set(got.finish_reasons)
    if name == "all_stop":  # sampling ends when every row has ended, not at max_new_tokens
        assert set(got.finish_reasons) == {"stop"}
        assert got.response_ids.shape[1] == got.response_lengths.max() < sampling.max_new_tokens
    if sampling.min_new_tokens:
        assert (got.response_lengths >= sampling.min_new_tokens).all()


def test_two_eos_ids_both_end_responses(policy):
    engine = _engine(policy, "loop")
    policy.generation_config.eos_token_id = [PAD, 1]
    try:
        torch.manual_seed(2)
        batch = engine.generate(PROMPTS, SamplingParams(n=6, max_new_tokens=24))
        torch.manual_seed(2)
        expected = _engine(policy, "generate").generate(
            PROMPTS, SamplingParams(n=6, max_new_tokens=24)
        )
    finally:
        policy.generation_config.eos_token_id = PAD
    assert torch.equal(batch.response_ids, expected.response_ids)
    last = batch.response_ids.gather(1, (batch.response_lengths - 1).unsqueeze(1)).squeeze(1)
    stopped = torch.tensor([r == "stop" for r in batch.finish_reasons])
    assert set(last[stopped].tolist()) == {PAD, 1}  # each EOS id ended some response


def test_synced_loop_matches_unsynced_in_a_process_group(policy, tmp_path):
    """synced=True all-reduces the "still sampling" flag each step (FSDP ranks run the same
    number of forward passes; 2 real ranks run in tests/distributed); alone it changes nothing."""
    import torch.distributed as dist

    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = (ids != 0).long()
    sampling = SamplingParams(n=2, max_new_tokens=16)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        runs = []
        for synced in (False, True):
            torch.manual_seed(4)
            runs.append(
                sample_responses(policy.eval(), ids, mask, sampling, [PAD], PAD, synced=synced)
            )
    finally:
        dist.destroy_process_group()
        policy.train()
    assert torch.equal(*runs)


def test_in_place_layer_returns_what_dynamic_layer_returns_as_it_grows():
    torch.manual_seed(0)
    chunks = [
        (torch.randn(3, 2, length, 4), torch.randn(3, 2, length, 4)) for length in (5, 1, 1, 2)
    ]
    dynamic, in_place = DynamicLayer(), InPlaceLayer(max_length=9, initial_capacity=4)
    capacities = []
    for keys, values in chunks:
        ref_k, ref_v = dynamic.update(keys, values)
        got_k, got_v = in_place.update(keys, values)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
        assert in_place.get_seq_length() == dynamic.get_seq_length()
        capacities.append(in_place._key_buffer.shape[2])
    assert capacities == [5, 9, 9, 9]  # grown to fit, then doubled (capped at 9), then in place
    dynamic.batch_repeat_interleave(2)
    in_place.batch_repeat_interleave(2)
    assert torch.equal(in_place.keys, dynamic.keys) and in_place.get_seq_length() == 9
    with pytest.raises(RuntimeError, match="max_length 9"):
        in_place.update(*chunks[1])


def test_unknown_decode_is_a_config_error():
    with pytest.raises(ValueError, match="rollout.engine.decode"):
        HFRolloutEngine(decode="fast")


def test_models_with_non_attention_layers_fall_back_to_generate(policy):
    from relift_pl.rollout.decode import supports

    assert supports(policy)
    hybrid = SimpleNamespace(config=Qwen2Config(num_hidden_layers=2))
    hybrid.config.layer_types = ["full_attention", "linear_attention"]
    assert not supports(hybrid)
    assert not supports(torch.nn.Linear(2, 2))  # not a transformers model


@pytest.mark.parametrize("every", [3, 8])
def test_checking_for_the_end_every_few_tokens_gives_the_same_responses(policy, every):
    """GPUs check every 8 tokens (a host read stalls the kernel queue); the extra tokens are
    sampled after every row ended and dropped, so the result equals checking every token."""
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = (ids != 0).long()
    runs = []
    for sampling in (SETTINGS["all_stop"], SETTINGS["plain"]):
        for stop_check_every in (1, every):
            torch.manual_seed(6)
            runs.append(sample_responses(policy.eval(), ids, mask, sampling, [PAD], PAD,
                                         stop_check_every=stop_check_every))
    policy.train()
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])
    assert runs[0].shape[1] < SETTINGS["all_stop"].max_new_tokens  # ended early: columns dropped


def test_one_token_prompts_have_nothing_to_prefill(policy):
    sampling = SamplingParams(n=3, max_new_tokens=12)
    batches = []
    for decode in ("generate", "loop"):
        torch.manual_seed(8)
        batches.append(_engine(policy, decode).generate([[5], [9]], sampling))
    assert torch.equal(batches[0].response_ids, batches[1].response_ids)
    assert batches[1].response_ids.shape[0] == 6
