"""Every config composes, and what can be built on a CPU is built."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from relift_pl.config import AlgorithmConfig
from tests_helpers import config_names

TRAINERS = config_names("trainer")
EXPERIMENTS = config_names("experiment")
CPU_TRAINERS = {"default", "cpu", "ddp", "fsdp"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_x_experiment_composes(make_cfg, trainer, experiment):
    cfg = make_cfg(f"trainer={trainer}", f"experiment={experiment}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    strategy = cfg.trainer.strategy
    if not isinstance(strategy, str):
        strategy = instantiate(strategy)
        if trainer in ("fsdp", "fsdp_8gpu", "multinode"):
            assert isinstance(strategy, ModelParallelStrategy)
        if trainer == "ddp":
            assert isinstance(strategy, DDPStrategy)
    if trainer in CPU_TRAINERS:
        built = instantiate(cfg.trainer, callbacks=[], logger=False)
        assert built.max_epochs == -1


def test_paper_recipe_builds_fsdp_8gpu_strategy(make_cfg):
    cfg = make_cfg("experiment=relift_qwen_math_7b", "trainer=fsdp_8gpu")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._data_parallel_size == 8 and strategy._tensor_parallel_size == 1
    assert cfg.trainer.devices == 8
    algo = instantiate(cfg.algorithm)
    assert isinstance(algo, AlgorithmConfig)
    assert (algo.group_size, algo.buffer_threshold, algo.num_mini_batches) == (8, 128, 2)
    assert cfg.data.batch_size == 128
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-Math-7B"
    assert Path(cfg.data.train_rows.path).exists(), "paths.data_dir should point at the shared data"


@pytest.mark.parametrize("algorithm", config_names("algorithm"))
def test_algorithms_instantiate_and_validate(make_cfg, algorithm):
    algo = instantiate(make_cfg(f"algorithm={algorithm}").algorithm)
    algo.validate()
    assert algo.rl_enabled == (algorithm != "sft")
    # Buffered SFT steps: ReLIFT and its ablations, and SFT-only; the other baselines fine-tune
    # through a warm-up phase or an added loss instead.
    assert algo.sft_enabled == (algorithm not in ("grpo", "sft_then_rl", "rl_with_sft_loss"))
    assert (algo.sft_warmup_steps > 0) == (algorithm == "sft_then_rl")
    assert (algo.sft_loss_coef > 0) == (algorithm == "rl_with_sft_loss")


def test_unknown_key_is_rejected(make_cfg):
    with pytest.raises(Exception, match="algorithm.not_a_knob"):
        make_cfg("algorithm.not_a_knob=1")


def test_checkpoint_monitor_is_a_plain_override(make_cfg):
    # The README's "keep the best checkpoint" override needs no "+".
    cfg = make_cfg("callbacks.checkpoint.monitor=val/avg", "callbacks.checkpoint.mode=max")
    checkpoint = instantiate(cfg.callbacks.checkpoint)
    assert (checkpoint.monitor, checkpoint.mode) == ("val/avg", "max")
    # A resumed run overwrites last.ckpt instead of writing last-v1.ckpt (tests/integration/test_cli.py).
    assert checkpoint._enable_version_counter is False
