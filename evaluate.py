"""Score a model or a training checkpoint on the benchmarks; writes results.{md,csv,png}.

Examples:
    python evaluate.py run_dir=outputs/<date>/<time>            # a train.py run, as it evaluated itself
    python evaluate.py model=tiny2 data=toy2                    # the toy world's base
    python evaluate.py model=pretrained model.name_or_path=/path/to/hf_model_dir trainer=gpu
    python evaluate.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt   # with that run's settings
    python evaluate.py callbacks.evaluation.max_problems=20 callbacks.evaluation.k=8
"""

import sys

import hydra
from omegaconf import DictConfig

from relift_pl.cli import check_top_level_keys, config_errors, exit_on_unknown_override
from relift_pl.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    # A bad value: one line, no traceback, and no results folder left behind.
    with config_errors(run_folder=cfg.paths.output_dir):
        check_top_level_keys(cfg, "evaluate")
        evaluate(cfg)


if __name__ == "__main__":
    exit_on_unknown_override(sys.argv[1:], "evaluate")  # ckpt=x: "did you mean ckpt_path?"
    main()
