"""Every config composes, and what can be built on a CPU is built."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from relift_pl.config import AlgorithmConfig
from relift_pl.strategies import ModelParallelStrategy as AtomicModelParallelStrategy
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
    # Data parallel over every rank (derived at set-up: see test_fsdp_shards_over_nodes_x_devices).
    assert strategy._data_parallel_size is None and strategy._tensor_parallel_size == 1
    assert cfg.trainer.devices == 8
    algo = instantiate(cfg.algorithm)
    assert isinstance(algo, AlgorithmConfig)
    assert (algo.group_size, algo.buffer_threshold, algo.num_mini_batches) == (8, 128, 2)
    assert cfg.data.batch_size == 128
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-Math-7B"
    for name, rows in cfg.data.eval_sets.items():
        assert Path(rows.path).exists(), f"{name}: paths.data_dir should point at the shared data"


@pytest.mark.parametrize(
    ("overrides", "ranks"),
    [
        (["trainer=fsdp"], 2),
        (["trainer=fsdp", "trainer.num_nodes=2", "trainer.devices=1"], 2),
        (["trainer=multinode", "trainer.num_nodes=2", "trainer.devices=1"], 2),
        (["trainer=multinode"], 16),
        (["trainer=multinode", "trainer.num_nodes=4", "trainer.devices=3"], 12),
    ],
)
def test_fsdp_shards_over_nodes_x_devices(make_cfg, monkeypatch, overrides, ranks):
    """Every sharded trainer config shards over num_nodes x devices, whatever the layout (the
    configs used to say devices, or 16 for trainer=multinode: any other layout failed after the
    model loaded)."""
    cfg = make_cfg(*overrides, "trainer.accelerator=cpu", "trainer.precision=32-true")
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, AtomicModelParallelStrategy)
    # Lightning's own set-up (process group, device mesh) needs the launched processes.
    monkeypatch.setattr(ModelParallelStrategy, "setup_environment", lambda self: None)
    strategy.setup_environment()
    assert strategy._data_parallel_size == ranks and strategy._tensor_parallel_size == 1


def test_paper_recipe_is_the_papers_run(make_cfg):
    """What `experiment=relift_qwen_math_7b trainer=fsdp_8gpu` composes, read as a reviewer would."""
    cfg = make_cfg("experiment=relift_qwen_math_7b", "trainer=fsdp_8gpu")
    # fp32 master weights, bf16 compute (FSDP2's MixedPrecisionPolicy under bf16-mixed).
    assert cfg.model.dtype == "float32" and cfg.trainer.precision == "bf16-mixed"
    # The 16k-think base, the same in the trainer and in vLLM.
    overrides = {"max_position_embeddings": 16384,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 40000}}
    assert cfg.model.config_overrides == overrides and cfg.rollout.engine.hf_overrides == overrides
    # vLLM rollouts, sleeping between them, sized for 8 x 80 GB next to FSDP2 training.
    assert cfg.rollout.engine._target_ == "relift_pl.rollout.vllm.VLLMRolloutEngine"
    assert cfg.rollout.engine.sleep_level == 2 and cfg.rollout.engine.dtype == "bfloat16"
    assert cfg.rollout.engine.max_model_len >= cfg.data.max_prompt_length + cfg.rollout.sampling.max_new_tokens
    assert cfg.rollout.max_logprob_diff_mean == "auto"
    # The paper's data: OpenR1-Math-46k R1 traces with the OpenR1 system prompt and <think> prompts.
    assert cfg.data.train_rows.path == "Elliott/Openr1-Math-46k-8192"
    assert cfg.data.train_rows.columns.demonstration == "target.0.content"
    assert cfg.data.system_prompt.startswith("Your task is to follow a systematic, thorough reasoning")
    assert cfg.data.chat_template == "auto"
    # The reference's evaluation protocol, every 10 steps, the best checkpoint kept.
    ev = cfg.callbacks.evaluation
    assert (ev.every_n_steps, ev.temperature, ev.top_p, ev.max_new_tokens) == (10, 0.6, 1.0, 8192)
    assert {name: ev.k_per_set.get(name, ev.k) for name in ("aime24", "aime25", "amc23", "math500",
            "olympiadbench")} == {"aime24": 32, "aime25": 32, "amc23": 32, "math500": 8, "olympiadbench": 8}
    assert set(cfg.data.eval_sets) == {"aime24", "aime25", "amc23", "math500", "minerva",
                                       "olympiadbench", "gpqa_diamond", "arc_c"}
    ck = cfg.callbacks.checkpoint
    assert (ck.monitor, ck.mode, ck.export_hf) == ("val/avg", "max", True)
    # Algorithm: lr 1e-6 both, no clip, constant normaliser 8192, entropy 1e-4, bounded log-probs.
    algo = instantiate(cfg.algorithm)
    assert algo.rl_optimizer.keywords["lr"] == algo.sft_optimizer.keywords["lr"] == 1e-6
    assert not algo.pg_loss.clip and algo.pg_loss.agg_mode == "constant"
    assert algo.pg_loss.loss_constant == 8192 and algo.pg_loss.entropy_coef == 1e-4
    assert algo.logprob_token_chunk and algo.max_tokens_per_micro_batch == 32768


@pytest.mark.parametrize("algorithm", config_names("algorithm"))
def test_algorithms_instantiate_and_validate(make_cfg, algorithm):
    algo = instantiate(make_cfg(f"algorithm={algorithm}").algorithm)
    algo.validate()
    assert algo.rl_enabled == (algorithm != "sft")
    # Buffered SFT steps: ReLIFT and its ablations, and SFT-only; the other baselines fine-tune
    # through a warm-up phase or an added loss instead.
    assert algo.sft_enabled == (algorithm not in ("grpo", "sft_then_rl", "rl_with_sft_loss", "luffy"))
    assert (algo.sft_warmup_steps > 0) == (algorithm == "sft_then_rl")
    assert (algo.sft_loss_coef > 0) == (algorithm == "rl_with_sft_loss")
    # LUFFY uses demonstrations inside the RL step (mixed groups), with policy shaping gamma 0.1.
    assert algo.mix_demos == (algorithm == "luffy")
    assert algo.pg_loss is None or algo.pg_loss.shaping_gamma == 0.1


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
