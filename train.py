"""Train a reasoning policy with ReLIFT. ``python train.py --help`` lists the config groups.

Examples:
    python train.py                                   # the toy world on CPU (the default)
    python train.py algorithm=grpo max_steps=20       # RL only
    python train.py experiment=relift_qwen_math_7b trainer=fsdp_8gpu
"""

import hydra
from omegaconf import DictConfig

from relift_pl.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
