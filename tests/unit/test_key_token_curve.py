"""The key-token curve of a run: each step-*.ckpt's policy teacher-forced through the level-4
demonstrations, as the base is (relift_pl.study.key_tokens)."""

from __future__ import annotations

import pytest
import torch

from relift_pl.models import load_policy, load_tokenizer
from relift_pl.study.key_tokens import checkpoint_curve, demo_token_probs, step_of, summary
from relift_pl.toy import world2
from relift_pl.toy.shipped import SHIPPED_DIR


def test_each_checkpoint_is_scored_with_its_own_weights(tmp_path):
    base = SHIPPED_DIR / "tiny2"
    model, tokenizer = load_policy(base), load_tokenizer(base)
    rows = world2.level_pool("val", 4)[:8]
    at_base = summary(demo_token_probs(model.eval(), tokenizer, rows))
    # Step 50: the base's weights as the module saves them; step 25: the final norm halved
    # (logits at half scale: a flatter distribution).
    state = {f"policy.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "step-000050.ckpt")
    state["policy.model.norm.weight"] *= 0.5
    torch.save({"state_dict": state}, tmp_path / "step-000025.ckpt")
    curve = checkpoint_curve(load_policy(base), tokenizer, list(tmp_path.glob("*.ckpt")), rows)
    assert list(curve) == [25, 50]
    assert curve[50] == at_base
    assert curve[25]["lowest_median"] > 10 * at_base["lowest_median"]


def test_step_of_reads_the_file_name(tmp_path):
    assert step_of(tmp_path / "step-000125.ckpt") == 125
    with pytest.raises(ValueError, match="last.ckpt: not a step-NNNNNN.ckpt"):
        step_of(tmp_path / "last.ckpt")
