"""The performance paths (the sampling loop, shared prompt prefill and log-prob passes,
metrics-only entropy) leave a whole training step unchanged: same samples, same update."""

from __future__ import annotations

import torch

from conftest import compose_cfg
from relift_pl.train import fit
from toy_overrides import QUICK_TOY

RUN = [
    *QUICK_TOY,
    "max_steps=1",
    "data.train_rows.levels=[3,4]",
    "callbacks.evaluation.before_training=false",
    "callbacks.evaluation.after_training=false",
    "algorithm.buffer_threshold=1",  # the SFT step runs too
    "algorithm.micro_batch_size=6",  # groups of 4 straddle micro-batches
    "algorithm.pg_loss.entropy_coef=0.01",  # the entropy gradient takes part
    # Plain SGD: the parameter change is lr x gradient (see test_micro_batch_equivalence.py).
    "algorithm.rl_optimizer._target_=torch.optim.SGD",
    "algorithm.sft_optimizer._target_=torch.optim.SGD",
    "algorithm.rl_optimizer.lr=1.0",
    "algorithm.sft_optimizer.lr=1.0",
    "algorithm.rl_grad_clip=1000",
    "algorithm.sft_grad_clip=1000",
]
PLAIN = [
    "algorithm.share_prompt_prefix=false",
    "rollout.engine.share_prompt_prefill=false",
    "rollout.engine.decode=generate",
]


def test_fast_paths_give_the_same_samples_and_update(tmp_path):
    captured = {}

    def run(name, extra):
        result = fit(compose_cfg([*RUN, *extra], output_dir=tmp_path / name))
        captured[name] = result
        return result.module.policy.state_dict()

    fast = run("fast", [])
    plain = run("plain", PLAIN)
    assert captured["fast"].module.sft_step == captured["plain"].module.sft_step == 1
    moved = max((fast[k] - plain[k]).abs().max().item() for k in fast)
    assert moved < 1e-5, moved
    base = run("base", [*PLAIN, "algorithm.rl_optimizer.lr=0", "algorithm.sft_optimizer.lr=0"])
    update = max((fast[k] - base[k]).abs().max().item() for k in fast)
    assert update > 1e-4  # the update is far larger than the difference: not vacuous
    assert all(torch.isfinite(v).all() for v in fast.values())
