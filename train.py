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

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from relift_pl.cli import check_top_level_keys, config_errors, say  # noqa: E402
from relift_pl.run_folder import run_folder_in_use  # noqa: E402
from relift_pl.train import train  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with config_errors():  # a bad value: one line, no traceback
        check_top_level_keys(cfg, "train")
        say(f"run directory: {run_folder_in_use(cfg.paths.output_dir)[0]}")
        train(cfg)
        say(f"outputs (checkpoints, logs, summary.json) are in {cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
