import torch

from relift_pl.micro_batching import pad_plan, plan_micro_batches


def layout(prompt_lens, response_lens, prompt_width=4, response_width=5):
    """Attention mask of [left-padded prompt | right-padded response] rows."""
    mask = torch.zeros(len(prompt_lens), prompt_width + response_width, dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        mask[row, prompt_width - p : prompt_width] = 1
        mask[row, prompt_width : prompt_width + r] = 1
    return mask


def test_fixed_count_covers_rows_in_order():
    mask = layout([4, 2, 3, 1, 2], [5, 1, 2, 3, 1])
    plan = plan_micro_batches(mask, 4, torch.arange(5), max_seqs=2)
    assert [mb.rows.tolist() for mb in plan] == [[0, 1], [2, 3], [4]]


def test_columns_are_trimmed_to_what_rows_use():
    mask = layout([2, 1], [1, 3])
    (mb,) = plan_micro_batches(mask, 4, torch.arange(2), max_seqs=8)
    # Longest prompt is 2 -> columns from 4 - 2 = 2; longest response 3.
    assert (mb.start, mb.response_len) == (2, 3)
    assert mb.columns(4) == slice(2, 7)
    # Nothing real is cut: every 1 of the mask lies inside the kept columns.
    assert mask[:, mb.columns(4)].sum() == mask.sum()


def test_token_budget_sorts_by_length_and_respects_budget():
    # Real lengths (prompt + response): 9, 3, 5, 4, 3.
    mask = layout([4, 2, 3, 1, 2], [5, 1, 2, 3, 1])
    plan = plan_micro_batches(mask, 4, torch.arange(5), max_seqs=8, max_tokens=10)
    rows = [mb.rows.tolist() for mb in plan]
    assert sorted(r for group in rows for r in group) == [0, 1, 2, 3, 4]
    assert rows[0] == [0]  # the 9-token row alone: 2 x 9 > 10
    for group in rows:
        lengths = mask[group].sum(-1)
        assert len(group) * int(lengths.max()) <= 10 or len(group) == 1


def test_pad_plan_adds_zero_weight_fillers():
    mask = layout([1, 1], [1, 1])
    plan = pad_plan(plan_micro_batches(mask, 4, torch.arange(2), max_seqs=1), 4)
    assert [mb.weight for mb in plan] == [1.0, 1.0, 0.0, 0.0]
