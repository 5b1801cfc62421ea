"""Runs ``fit`` under a multi-process strategy and saves what each rank ends with.

Lightning's launcher re-executes this script once per rank, so every rank writes
``<out>/rank<r>.pt`` with its full (unsharded) parameters and counters.
Usage: python dist_worker.py OUT_DIR [hydra overrides...]
"""

import sys
from pathlib import Path

import torch

# The repository this file is in first (a script's folder is on sys.path, its repository is not:
# relift_pl and callbacks would come from wherever the package is installed), then tests/.
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
from callbacks.hard_question_mining import HardQuestionMining  # noqa: E402
from conftest import compose_cfg  # noqa: E402
from relift_pl.train import fit  # noqa: E402


def _as_list(optimizers):
    return optimizers if isinstance(optimizers, list) else [optimizers]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = fit(compose_cfg(sys.argv[2:], output_dir=out))
    module = result.module
    mining = next(c for c in result.trainer.callbacks if isinstance(c, HardQuestionMining))
    state = {
        name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().cpu()
        for name, value in module.policy.state_dict().items()
    }
    torch.save(
        {
            "state": state,
            "rl_step": module.rl_step,
            "sft_step": module.sft_step,
            "weights_version": module.weights_version,
            "buffer": module.buffer.state_dict(),
            # This rank's mining state: its random-selection stream and its count.
            "mining": (mining._rng.getstate(), mining.rows_without_demo),
            "world_size": result.trainer.world_size,
            "initial_seed": torch.initial_seed(),
            "metrics": {k: float(v) for k, v in result.trainer.callback_metrics.items()},
            "param_dtypes": sorted({str(p.dtype) for p in module.policy.parameters()}),
            "optimizer_state_dtypes": sorted({
                str(value.dtype)
                for optimizer in _as_list(module.optimizers(use_pl_optimizer=False))
                for state in optimizer.state.values()
                for key, value in state.items()
                if torch.is_tensor(value) and key != "step"
            }),
        },
        out / f"rank{result.trainer.global_rank}.pt",
    )
