"""Train a reasoning policy with ReLIFT. ``python train.py --help`` lists the config groups.

Examples:
    python train.py                                   # the toy world on CPU (the default)
    python train.py algorithm=grpo max_steps=20       # RL only
    python train.py experiment=relift_qwen_math_7b trainer=fsdp_8gpu
"""

# Before the other imports (seconds) and the model load (minutes at 7B): a scheduler's SIGTERM or
# a Ctrl-C from here on ends in a step-0 checkpoint and a clean stop, not a killed process.
from relift_pl.signals import catch_from_start

catch_from_start()

import sys  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from relift_pl.cli import check_top_level_keys, config_errors, exit_on_unknown_override, say  # noqa: E402
from relift_pl.train import train  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    # A bad value: one line, no traceback, and no run folder left for a run that never started.
    with config_errors(run_folder=cfg.paths.output_dir):
        check_top_level_keys(cfg, "train")
        train(cfg)  # prints the run directory once the config checks passed
        say(f"outputs (checkpoints, logs, summary.json) are in {cfg.paths.output_dir}")


if __name__ == "__main__":
    exit_on_unknown_override(sys.argv[1:], "train")  # max_step=5: "did you mean max_steps?"
    main()
