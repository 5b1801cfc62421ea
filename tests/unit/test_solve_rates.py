"""Solve rates count the policy's own samples only (LUFFY mixes a demonstration into each group)."""

import torch

from callbacks.hard_question_mining import HardQuestionMining


def test_solve_rates_over_own_samples_by_hand():
    # Three prompts, G = 4; the last column is a mixed-in demonstration scored 1 in rows 0-1.
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    sampled = torch.tensor([[True, True, True, False]] * 3)
    rates = {k: float(n) / d for k, (n, d) in HardQuestionMining._solve_rates(rewards, sampled).items()}
    # Own samples: row 0 none correct, row 1 all 3 correct, row 2 one correct.
    assert rates == {"train/solve_none_rate": 1 / 3, "train/solve_all_rate": 1 / 3, "train/solved_rate": 2 / 3}
    # Counting the demonstration as a rollout would call row 0 solved and none "solve all" but row 1.
    plain = {k: float(n) / d for k, (n, d) in HardQuestionMining._solve_rates(rewards).items()}
    assert plain["train/solve_none_rate"] == 0.0
