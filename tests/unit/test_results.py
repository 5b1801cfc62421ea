"""results.md / results.csv / results.png state the k of each set, also when sets differ."""

from __future__ import annotations

import csv

from callbacks.evaluation import SetScore
from relift_pl.results import markdown_table, write_results

MIXED = [SetScore("aime24", 0.25, 0.5, 30, 32), SetScore("math500", 0.5, 0.75, 500, 8)]
SAME = [SetScore("level1", 0.25, 0.5, 4, 4), SetScore("level2", 0.5, 1.0, 4, 4)]


def csv_rows(path) -> list[list[str]]:
    with open(path) as f:
        return list(csv.reader(f))


def test_sets_with_different_k(tmp_path):
    files = write_results(MIXED, tmp_path, {"k": "aime24=32, math500=8"})
    assert csv_rows(files["csv"]) == [
        ["benchmark", "avg@k", "pass@k", "problems", "k"],
        ["aime24", "0.25", "0.5", "30", "32"],
        ["math500", "0.5", "0.75", "500", "8"],
        ["average", "0.375", "0.625", "530", ""],  # val/avg: the mean of the sets' avg@k
    ]
    markdown = files["md"].read_text()
    assert "- k: aime24=32, math500=8\n" in markdown
    assert "| benchmark | k | avg@k (%) | pass@k (%) | problems |" in markdown
    assert "| aime24 | 32 | 25.0 | 50.0 | 30 |" in markdown
    assert "| math500 | 8 | 50.0 | 75.0 | 500 |" in markdown
    assert "| **average** | | **37.5** | **62.5** | 530 |" in markdown
    assert files["png"].stat().st_size > 0


def test_one_k_for_every_set(tmp_path):
    files = write_results(SAME, tmp_path)
    assert csv_rows(files["csv"])[0] == ["benchmark", "avg@4", "pass@4", "problems", "k"]
    assert csv_rows(files["csv"])[-1] == ["average", "0.375", "0.75", "8", "4"]
    markdown = markdown_table(SAME)
    assert "| benchmark | k | avg@4 (%) | pass@4 (%) | problems |" in markdown
    assert "| level1 | 4 | 25.0 | 50.0 | 4 |" in markdown
