"""Token-budget micro-batching changes how the work is split, never the update."""

from __future__ import annotations

from conftest import compose_cfg
from relift_pl.train import fit
from toy_overrides import QUICK_TOY

RUN = [
    *QUICK_TOY,
    "max_steps=1",
    "data.train_rows.levels=[3,4]",
    "callbacks.evaluation.before_training=false",
    "callbacks.evaluation.after_training=false",
    "algorithm.buffer_threshold=1",  # the SFT step runs too, on every hardest row
    "algorithm.sft_micro_batch_size=64",
    # Plain SGD: the parameter change is lr x gradient, so parameters compare gradients
    # (AdamW's first step is ~lr x sign(gradient), which magnifies rounding noise).
    "algorithm.rl_optimizer._target_=torch.optim.SGD",
    "algorithm.sft_optimizer._target_=torch.optim.SGD",
    "algorithm.rl_optimizer.lr=1.0",
    "algorithm.sft_optimizer.lr=1.0",
    "algorithm.rl_grad_clip=1000",
    "algorithm.sft_grad_clip=1000",
]


def test_token_budget_micro_batches_give_the_same_update(tmp_path):
    whole = fit(compose_cfg([*RUN, "algorithm.micro_batch_size=64"], output_dir=tmp_path / "a"))
    split = fit(compose_cfg(
        [*RUN, "algorithm.micro_batch_size=64", "algorithm.max_tokens_per_micro_batch=60"],
        output_dir=tmp_path / "b",
    ))
    assert whole.module.sft_step == split.module.sft_step == 1
    a, b = whole.module.policy.state_dict(), split.module.policy.state_dict()
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 1e-5, moved
    base = fit(compose_cfg([*RUN, "max_steps=1", "algorithm.rl_optimizer.lr=0",
                            "algorithm.sft_optimizer.lr=0"], output_dir=tmp_path / "c"))
    # The update itself is far larger than the difference: the check is not vacuous.
    update = max((a[k] - base.module.policy.state_dict()[k]).abs().max().item() for k in a)
    assert update > 1e-4
