"""The default run's world (experiment=toy2) through train.py: its base (digit tasks in the
teacher's words), its four eval levels, and ReLIFT's SFT step on level-4 rows."""

from __future__ import annotations

from callbacks.evaluation import BenchmarkEvaluation
from conftest import compose_cfg
from relift_pl.train import fit
from toy_overrides import QUIET_TOY


def test_toy2_relift_mines_level_4_and_takes_an_sft_step(tmp_path):
    cfg = compose_cfg([
        *QUIET_TOY, "experiment=toy2", "max_steps=3",  # the default, after QUIET_TOY's world 1
        "data.train_rows.levels=[4]",  # beyond the base's reach: every group fails, the buffer fills
        "rollout.sampling.max_new_tokens=96", "callbacks.evaluation.after_training=true",
    ], output_dir=tmp_path / "run")  # fmt: skip
    result = fit(cfg)
    module = result.module
    assert module.step_count == 3 and module.rl_step == 3
    assert module.sft_step >= 1  # M=4 hardest level-4 prompts after the first RL step
    assert module.demos_used and all(str(i).startswith("toy2-L4-") for i in module.demos_used)
    evaluation = next(c for c in result.trainer.callbacks if isinstance(c, BenchmarkEvaluation))
    step, scores = evaluation.history[-1]
    assert step == 3 and {f"val/level{n}/avg@2" for n in (1, 2, 3, 4)} <= set(scores), scores
