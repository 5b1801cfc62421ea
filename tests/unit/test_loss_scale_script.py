"""scripts/loss_scale.py derives the recipe's loss scales and prints the clips they amount to."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def loss_scale(*overrides: str) -> str:
    proc = subprocess.run(
        [sys.executable, "scripts/loss_scale.py", "experiment=relift_qwen_math_7b", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_recipe_scales_are_the_reference_layouts_and_the_equivalent_clips_are_printed():
    out = loss_scale("trainer=fsdp_8gpu")
    # 1,024 rollouts / 2 mini-batches / 8 GPUs = 64; 0.7 / 64 on the mean's gradient.
    assert "x rl_loss_scale=64 before backward" in out and "needs rl_loss_scale=64)" in out
    assert "= 0.01094 on the mean's" in out
    # 1/8 of a mean over 32 groups of 4: the SFT clip 1.0 is 8 on the unscaled gradient.
    assert "mean over 32 groups of 4" in out and "= 8 on the unscaled one" in out
    # 512 x 3,752 tokens in 8 shards of 32,768: 8 x 8 = 64 groups of 512 x 3,502 / 64 tokens.
    assert "64 groups of 28016 response tokens per mini-batch" in out
    assert "the reference's 8 GPUs each form 8" in out
    assert "(sum / 8192) the entropy would weigh 3.42x as much" in out


def test_a_null_loss_constant_falls_back_to_the_longest_response():
    # The loss then divides by the batch's widest response, at most max_new_tokens (8,192).
    out = loss_scale("algorithm.pg_loss.loss_constant=null")
    assert "(sum / 8192) the entropy would weigh 3.42x as much" in out
    assert "loss_constant null" in out


def test_another_agg_mode_prints_no_reference_derivation():
    # The reference's per-GPU sum over rollouts is 64 x the project's loss only under the
    # constant normaliser: with a token mean neither that nor the entropy's ratio holds.
    out = loss_scale("algorithm.pg_loss.agg_mode=token_mean")
    assert "64 x the mean" not in out and "sum / 8192" not in out and "needs rl_loss_scale" not in out
    assert "the scale derivation assumes the constant normaliser" in out
    assert "= 0.01094 on the unscaled one" in out
