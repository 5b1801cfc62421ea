"""Checks over one source's loaded rows that warn rather than stop: golds the grader cannot read
(no answer but the gold's own copy can score 1 against them, so the row stays "hardest") and
problems that repeat under another id (trained twice as often)."""

from __future__ import annotations

from typing import Any

from relift_pl.quiet import rank_zero_logger
from relift_pl.rewards.verifier import gold_is_readable

log = rank_zero_logger(__name__)  # every rank loads the same rows: rank 0 says so

FIRST_IDS = 5
"""How many ids a warning names."""


def warn_about_rows(rows: list[dict[str, Any]], source: str, grading: str | None) -> None:
    """Logs a warning with a count and the first ids for each kind of doubtful row."""
    unreadable = unreadable_golds(rows, grading)
    if unreadable:
        log.warning(
            "%s: %d of %d gold answers cannot be read by math-verify, so no answer can match them "
            "(check or fix those rows): %s", source, len(unreadable), len(rows), _first(unreadable),
        )  # fmt: skip
    repeated = repeated_problems(rows)
    if repeated:
        log.warning(
            "%s: %d of %d problems repeat an earlier row's under another id, so they are drawn twice "
            "as often (remove the copies): %s", source, len(repeated), len(rows), _first(repeated),
        )  # fmt: skip


def unreadable_golds(rows: list[dict[str, Any]], grading: str | None) -> list[str]:
    """Ids of math-graded rows whose gold math-verify cannot read (each distinct gold parsed once)."""
    if grading in ("choice", "integer"):
        return []
    readable: dict[str, bool] = {}
    found = []
    for row in rows:
        gold = row["answer"]
        if grading != "math" and gold.strip() in tuple("ABCDE"):
            continue  # graded as a choice by reward.mode=auto
        if gold not in readable:
            readable[gold] = gold_is_readable(gold)
        if not readable[gold]:
            found.append(row["id"])
    return found


def repeated_problems(rows: list[dict[str, Any]]) -> list[str]:
    """``"<id> (= <first id>)"`` for each row whose problem (spacing aside) an earlier row has."""
    first_id: dict[str, str] = {}
    found = []
    for row in rows:
        key = " ".join(row["problem"].split())
        if key in first_id:
            found.append(f"{row['id']} (= {first_id[key]})")
        else:
            first_id[key] = row["id"]
    return found


def _first(ids: list[str]) -> str:
    return ", ".join(ids[:FIRST_IDS]) + (", ..." if len(ids) > FIRST_IDS else "")
