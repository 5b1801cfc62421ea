import pytest
import torch

from relift_pl.rollout.base import cut_at_eos, left_pad, right_pad


def test_left_and_right_pad():
    ids, mask = left_pad([[1, 2], [3]], pad_id=0)
    assert ids.tolist() == [[1, 2], [0, 3]]
    assert mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = right_pad([[1, 2], [3]], pad_id=9)
    assert ids.tolist() == [[1, 2], [3, 9]]
    assert mask.tolist() == [[1, 1], [1, 0]]


def test_cut_at_eos_keeps_first_eos_and_masks_the_rest():
    eos, pad = 5, 0
    raw = torch.tensor([
        [7, 5, 7, 5],  # stops at position 1; later tokens are garbage
        [7, 7, 7, 7],  # never stops: truncated
        [5, 7, 7, 7],  # stops immediately
    ])
    ids, mask, reasons = cut_at_eos(raw, [eos], pad)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ids.tolist() == [[7, 5, 0, 0], [7, 7, 7, 7], [5, 0, 0, 0]]
    assert reasons == ["stop", "length", "stop"]


# -- vLLM completions -> RolloutBatch (pure; the real engine is checked in tests/vllm) ----------
def test_vllm_rows_keep_their_own_length_and_finish_reason_when_pad_is_eos():
    from relift_pl.rollout.vllm_outputs import completions_to_batch

    eos = pad = 0  # the toy model and Qwen2.5-Math pad with their EOS
    tokens = [
        [7, 8, 9, 6, 5],  # cut by max_model_len after 5 tokens (a long prompt)
        [7, 0],  # stopped on EOS
        [7, 8, 9, 6, 5, 4, 3, 2],  # cut by max_new_tokens (a short prompt)
    ]
    logprobs = [[-1.0] * 5, [-0.5, -0.25], [-2.0] * 8]
    batch = completions_to_batch(
        [[1, 2, 3], [4], [5]], tokens, logprobs, ["length", "stop", "length"], n=1, pad_id=pad
    )
    assert batch.response_mask.sum(-1).tolist() == [5, 2, 8]  # the padding EOS is not a token
    assert batch.finish_reasons == ["length", "stop", "length"]
    assert batch.truncated.tolist() == [True, False, True]
    assert batch.response_ids[1].tolist() == [7, eos, pad, pad, pad, pad, pad, pad]
    assert batch.logprobs[0].tolist() == [-1.0] * 5 + [0.0] * 3
    assert batch.logprobs[1, :2].tolist() == [-0.5, -0.25]
    assert batch.prompt_ids.tolist() == [[1, 2, 3], [pad, pad, 4], [pad, pad, 5]]


def test_vllm_rows_are_prompt_major_with_n_samples():
    from relift_pl.rollout.vllm_outputs import completions_to_batch

    batch = completions_to_batch(
        [[1, 2], [3]], [[5], [6, 0], [7], [8]], [[-1.0], [-1.0, -1.0], [-1.0], [-1.0]],
        ["length", "stop", "length", "length"], n=2, pad_id=0,
    )
    assert batch.prompt_ids.tolist() == [[1, 2], [1, 2], [0, 3], [0, 3]]
    assert batch.response_lengths.tolist() == [1, 2, 1, 1]


def test_vllm_aborted_response_is_an_error():
    from relift_pl.rollout.vllm_outputs import completions_to_batch

    with pytest.raises(RuntimeError, match=r"finish_reason='abort'"):
        completions_to_batch([[1]], [[5]], [[-1.0]], ["abort"], n=1, pad_id=0)


# -- per-request seeds ---------------------------------------------------------------------------
def _streams(seeds, n):
    """Every (request, sample) stream's seed as vLLM derives it: sample j of seed s gets s + j."""
    return [s + j for s in seeds for j in range(n)]


@pytest.mark.parametrize("n", [1, 4, 8])
def test_request_seeds_give_every_prompt_and_sample_its_own_stream(n):
    from relift_pl.rollout.vllm_outputs import request_seeds

    seeds = request_seeds(3, num_prompts=6, n=n)
    assert len(set(_streams(seeds, n))) == 6 * n
    # Data-parallel engines see different prompts: their streams differ too.
    both = [request_seeds(3, 6, n, engine_index=r, num_engines=2) for r in (0, 1)]
    assert len(set(_streams(both[0], n) + _streams(both[1], n))) == 2 * 6 * n
    # The next seed's call does not reuse this call's streams.
    assert not set(_streams(seeds, n)) & set(_streams(request_seeds(4, 6, n), n))
    assert all(0 <= s < 2**62 for s in request_seeds(2**62, 6, n, 1, 8))
    assert request_seeds(None, 3, n) == [None, None, None]


# -- leaving the trainer's precision context -----------------------------------------------------
def test_outside_precision_context_turns_autocast_off_and_restores_it():
    from relift_pl.rollout.base import outside_precision_context

    old = torch.get_default_dtype()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.set_default_dtype(torch.bfloat16)
            with outside_precision_context():
                assert not torch.is_autocast_enabled("cpu")
                assert torch.get_default_dtype() == torch.float32
                x = torch.ones(2, 2)
                assert torch.nn.functional.linear(x, x).dtype == torch.float32
            assert torch.is_autocast_enabled("cpu")
            assert torch.get_default_dtype() == torch.bfloat16
            assert torch.nn.functional.linear(x, x).dtype == torch.bfloat16
    finally:
        torch.set_default_dtype(old)
