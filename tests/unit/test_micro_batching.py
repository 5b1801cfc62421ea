import pytest
import torch

from relift_pl.micro_batching import (
    group_sizes,
    min_group_count,
    pad_plan,
    plan_micro_batches,
    row_lengths,
    token_budget_groups,
)


def layout(prompt_lens, response_lens, prompt_width=4, response_width=5):
    """Masks of [left-padded prompt | right-padded response] rows."""
    prompt = torch.zeros(len(prompt_lens), prompt_width, dtype=torch.long)
    response = torch.zeros(len(prompt_lens), response_width, dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        prompt[row, prompt_width - p :] = 1
        response[row, :r] = 1
    return prompt, response


def plan(prompt_lens, response_lens, rows=None, **kwargs):
    rows = range(len(prompt_lens)) if rows is None else rows
    return plan_micro_batches(prompt_lens, response_lens, 4, rows, **kwargs)


def test_row_lengths_read_the_masks():
    assert row_lengths(*layout([4, 2], [1, 5])) == ([4, 2], [1, 5])


def test_fixed_count_covers_rows_in_order():
    micro = plan([4, 2, 3, 1, 2], [5, 1, 2, 3, 1], max_seqs=2)
    assert [mb.rows.tolist() for mb in micro] == [[0, 1], [2, 3], [4]]


def test_columns_are_trimmed_to_what_rows_use():
    prompt, response = layout([2, 1], [1, 3])
    mask = torch.cat([prompt, response], 1)
    (mb,) = plan([2, 1], [1, 3], max_seqs=8)
    # Longest prompt is 2 -> columns from 4 - 2 = 2; longest response 3.
    assert (mb.start, mb.response_len) == (2, 3)
    assert mb.columns(4) == slice(2, 7)
    assert mb.width(4) == 5
    # Nothing real is cut: every 1 of the mask lies inside the kept columns.
    assert mask[:, mb.columns(4)].sum() == mask.sum()


def test_token_budget_sorts_by_length_and_respects_budget():
    # Real lengths (prompt + response): 9, 3, 5, 4, 3.
    prompts, responses = [4, 2, 3, 1, 2], [5, 1, 2, 3, 1]
    micro = plan(prompts, responses, max_seqs=8, max_tokens=10)
    rows = [mb.rows.tolist() for mb in micro]
    assert sorted(r for group in rows for r in group) == [0, 1, 2, 3, 4]
    assert rows[0] == [0]  # the 9-token row alone: 2 x 9 > 10
    for mb in micro:  # what the forward pass runs: rows x (longest prompt + longest response)
        assert len(mb.rows) * mb.width(4) <= 10 or len(mb.rows) == 1


def test_token_budget_counts_the_columns_the_forward_runs():
    # Rows of 8 + 1 and 1 + 8 tokens: each is 9 tokens, but together the forward pass runs
    # 2 x (8 + 8) = 32 columns, not 2 x 9 = 18. A budget of 18 must keep them apart.
    micro = plan([8, 1], [1, 8], max_seqs=8, max_tokens=18)
    assert [mb.rows.tolist() for mb in micro] == [[0], [1]]
    assert plan([8, 1], [1, 8], max_seqs=8, max_tokens=32)[0].rows.tolist() == [0, 1]


def test_planning_takes_python_lengths_not_device_tensors():
    # The planner never touches a tensor of the batch: lengths are read once from the CPU masks,
    # so a mask on the GPU cannot meet CPU row indices (the crash CUDA would raise), and there is
    # no host sync per row. Rows come back as CPU indices that index a tensor on any device.
    micro = plan([3, 1, 2], [2, 2, 1], rows=[2, 0], max_seqs=8, max_tokens=100)
    (mb,) = micro
    assert mb.rows.device.type == "cpu" and sorted(mb.rows.tolist()) == [0, 2]
    on_meta = torch.empty(3, 9, device="meta")
    assert on_meta[mb.rows].shape == (2, 9)


def test_pad_plan_adds_zero_weight_fillers():
    micro = pad_plan(plan([1, 1], [1, 1], max_seqs=1), 4)
    assert [mb.weight for mb in micro] == [1.0, 1.0, 0.0, 0.0]


def test_pad_plan_needs_a_row_to_copy():
    with pytest.raises(ValueError, match="zero-weight row"):
        pad_plan([], 2)


def test_token_budget_groups_count_and_balance():
    # 18 tokens at a budget of 10: ceil(18 / 10) = 2 groups; the balanced split is {7, 2} {5, 4}.
    assert min_group_count([7, 5, 4, 2], 10) == 2
    assert token_budget_groups([7, 5, 4, 2], 10) == [[0, 3], [1, 2]]
    # A count set from outside (the max over ranks) wins over the rows' own, capped at the rows.
    assert token_budget_groups([7, 5, 4, 2], 10, count=3) == [[0], [1], [2, 3]]
    assert token_budget_groups([3, 3], 1, count=5) == [[0], [1]]


def test_min_group_count_in_shards():
    # 18 tokens in 3 shards of a 10-token budget: each shard's 6 need 1 group, 3 in all; 61
    # tokens in 2 shards: 30.5 each need 4, 8 in all (not ceil(61 / 10) = 7).
    assert min_group_count([7, 5, 4, 2], 10, shards=3) == 3
    assert min_group_count([61], 10, shards=2) == 8 and min_group_count([61], 10) == 7
    assert min_group_count([], 10, shards=4) == 4


def test_group_sizes_gives_each_row_its_groups_total():
    assert group_sizes([[0, 3], [1, 2]], [4, 1, 2, 3]) == [7, 3, 3, 7]
