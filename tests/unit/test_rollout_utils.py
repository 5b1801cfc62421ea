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
