"""The shipped toy bases: pinned by hash, loaded by the default run, and scoring what they scored
when shipped (the evaluation is seeded: its step-0 scores fingerprint a base). Scored on the
validation split: the study's rules keep the test split for the study."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from conftest import compose_cfg
from relift_pl.study.runs import step0_scores
from relift_pl.study.stats import accuracy
from relift_pl.toy.shipped import SHIPPED_DIR, WEIGHTS_FILE, sha256, verify_shipped

WEIGHTS_SHA256 = {
    "tiny": "903a4d8d6f178fb44ede57a80e4f463a08540a1a2c7b4aef42df5a7d3cf5e057",  # experiment=toy
    "tiny2": "3a1b8807a6df2fb1f502380a835cf195224cf99b1376d5e2c2e12930081aa6a1",  # the default
}
# The default run's step-0 evaluation on the validation split (avg@4 at T=1, %): the premise
# runs' base row in docs/results/toy2_premise.md.
STEP0 = {"level1": 96.43, "level2": 98.05, "level3": 52.73, "level4": 0.0}
ON_VALIDATION = [f"data.eval_sets.{level}.split=val" for level in STEP0]


@pytest.mark.parametrize("name", sorted(WEIGHTS_SHA256))
def test_shipped_weights_are_pinned(name):
    assert sha256(SHIPPED_DIR / name / WEIGHTS_FILE) == WEIGHTS_SHA256[name]
    verify_shipped(SHIPPED_DIR / name)  # every file against SHA256SUMS


def test_the_default_run_loads_the_shipped_base_and_scores_its_step_0(tmp_path):
    cfg = compose_cfg(["num_threads=1", "logger=csv", *ON_VALIDATION], output_dir=tmp_path)
    assert str(instantiate(cfg.model.build)()) == str(SHIPPED_DIR / "tiny2")
    scores = step0_scores(cfg)
    measured = accuracy({s.name: {"correct": s.per_problem} for s in scores}, list(STEP0))
    # Another CPU's float kernels can flip a rare sample: allow one of level 1's 84 (21 x 4).
    for level, expected in STEP0.items():
        assert measured[level] * 100 == pytest.approx(expected, abs=100 / (4 * 21)), (level, measured)


def test_the_first_worlds_run_loads_its_shipped_base():
    cfg = compose_cfg(["experiment=toy"])
    assert str(instantiate(cfg.model.build)()) == str(SHIPPED_DIR / "tiny")
