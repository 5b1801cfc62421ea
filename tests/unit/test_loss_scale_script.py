"""scripts/loss_scale.py derives the recipe's loss scales and prints the clips they amount to."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_recipe_scales_are_the_reference_layouts_and_the_equivalent_clips_are_printed():
    proc = subprocess.run(
        [sys.executable, "scripts/loss_scale.py", "experiment=relift_qwen_math_7b", "trainer=fsdp_8gpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # 1,024 rollouts / 2 mini-batches / 8 GPUs = 64; 0.7 / 64 on the mean's gradient.
    assert "x rl_loss_scale=64 before backward" in out and "needs rl_loss_scale=64)" in out
    assert "= 0.01094 on the mean's" in out
    # 1/8 of a mean over 32 groups of 4: the SFT clip 1.0 is 8 on the unscaled gradient.
    assert "mean over 32 groups of 4" in out and "= 8 on the unscaled one" in out
    assert "8 groups of 28016 response tokens" in out and "3.42x" in out
