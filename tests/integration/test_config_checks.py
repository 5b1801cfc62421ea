"""Config checks that need no model: master weights, SFT-only batches, top-level keys."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF, compose_cfg
from relift_pl.cli import check_top_level_keys, declared_top_level_keys, unknown_override_message
from relift_pl.config import ConfigError
from relift_pl.validation import check_config, check_master_weights

# -- fp32 master weights ----------------------------------------------------------------------
GPU_MODELS = ["model=qwen2_5_math_1_5b", "model=qwen2_5_math_7b"]


@pytest.mark.parametrize("model", GPU_MODELS)
@pytest.mark.parametrize("trainer", ["gpu", "fsdp_8gpu", "multinode"])
def test_every_gpu_trainer_config_trains_fp32_master_weights(model, trainer):
    cfg = compose_cfg([model, f"trainer={trainer}"])
    assert cfg.model.dtype == "float32"
    assert cfg.trainer.precision == "bf16-mixed"
    check_master_weights(cfg)  # no error


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        (["model=qwen2_5_math_1_5b", "trainer=gpu", "model.dtype=bfloat16"], "model.dtype=bfloat16"),
        (["model=pretrained", "model.name_or_path=x", "model.dtype=float16"], "model.dtype=float16"),
        (["trainer=gpu", "trainer.precision=bf16-true"], "trainer.precision=bf16-true"),
        (["trainer.precision=16-true"], "trainer.precision=16-true"),
    ],
)
def test_training_refuses_16_bit_master_weights(overrides, setting):
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        check_config(cfg, training=True)
    assert str(err.value) == (
        f"{setting} keeps the trained weights in 16 bits, where AdamW updates smaller than a "
        "weight's rounding step (lr 1e-6 on bf16 weights) are lost; train with "
        "model.dtype=float32 and trainer.precision=bf16-mixed (16-bit compute, fp32 master "
        "weights), or set model.allow_bf16_master_weights=true to accept the loss"
    )
    # Evaluation runs no optimizer; the opt-out key lets training through.
    check_config(cfg, training=False)
    check_config(compose_cfg([*overrides, "model.allow_bf16_master_weights=true"]), training=True)


@pytest.mark.parametrize("model", ["tiny", "pretrained", "qwen2_5_math_1_5b", "qwen2_5_math_7b"])
def test_every_model_config_declares_the_opt_out_off(model):
    assert compose_cfg([f"model={model}"]).model.allow_bf16_master_weights is False


# -- SFT-only runs: M == B --------------------------------------------------------------------
def test_sft_on_the_toy_follows_the_batch_size():
    # experiment=toy used to set M=16 literally: B=32 then used half the demonstrations.
    cfg = compose_cfg(["algorithm=sft", "data.batch_size=32"])
    assert cfg.algorithm.buffer_threshold == 32
    check_config(cfg, training=True)


def test_a_bad_batch_size_is_named_not_the_buffer_threshold_it_feeds():
    # experiment=toy2 sets algorithm.buffer_threshold: ${data.batch_size}; the message named it.
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg(["data.batch_size=-3"]), training=True)
    assert str(err.value) == "data.batch_size must be >= 1, got -3"


def test_sft_only_run_with_m_not_b_is_refused():
    cfg = compose_cfg(["algorithm=sft", "data.batch_size=32", "algorithm.buffer_threshold=16"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg, training=True)
    assert str(err.value) == (
        "algorithm.buffer_threshold (M=16) must equal data.batch_size (B=32) when "
        "algorithm.rl_enabled is false (each SFT step takes one batch's demonstrations): set "
        "algorithm.buffer_threshold=${data.batch_size}, as algorithm=sft does"
    )
    # ReLIFT's buffer fills from hardest questions only: any M is fine there.
    check_config(compose_cfg(["data.batch_size=32", "algorithm.buffer_threshold=16"]), training=True)


# -- unknown top-level keys -------------------------------------------------------------------
def test_misspelled_top_level_key_is_refused_with_close_matches():
    cfg = compose_cfg(["+max_step=5"])  # what Hydra's own hint ("use +") leads to
    with pytest.raises(ConfigError) as err:
        check_top_level_keys(cfg, "train")
    assert str(err.value) == (
        "max_step is not a top-level key of conf/train.yaml; did you mean max_steps? "
        "Remove it or fix its spelling."
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_step=5"], "max_step is not a top-level key of conf/train.yaml; did you mean max_steps?"),
        (["data.batch_size=4", "algorithm.group_sise=4"],
         "algorithm.group_sise is not a key of algorithm; did you mean group_size?"),
        (["experiment=paper_rehearsal", "rollout.engine.kv_cache_memory_byte=1"],
         "rollout.engine.kv_cache_memory_byte is not a key of rollout.engine; did you mean kv_cache_memory_bytes?"),
        (["callbacks.evaluaton.k=3"], "callbacks.evaluaton is not a key of callbacks; did you mean evaluation?"),
    ],
)
def test_an_override_of_a_missing_key_names_the_close_matches(overrides, message):
    # Hydra's own message for these ("To append to your config use +max_step=5") invites the wrong
    # fix; train.py / evaluate.py print this one before Hydra starts.
    assert unknown_override_message(overrides, "train") == f"{message} Remove it or fix its spelling."


def test_overrides_that_compose_or_fail_otherwise_are_left_to_hydra():
    assert unknown_override_message(["max_steps=5", "algorithm=grpo", "hydra.run.dir=x"], "train") is None
    assert unknown_override_message(["trainer=no_such_trainer"], "train") is None  # Hydra lists the options
    assert unknown_override_message(["ckpt=x"], "evaluate").startswith("ckpt is not a top-level key of conf/evaluate.yaml")


def test_declared_top_level_keys():
    train = declared_top_level_keys("train")
    assert {"seed", "max_steps", "num_threads", "ckpt_path", "reward"} <= train
    assert {"trainer", "model", "data", "algorithm", "rollout", "callbacks", "logger", "paths"} <= train
    assert train <= declared_top_level_keys("evaluate")
    check_top_level_keys(compose_cfg([]), "train")
    check_top_level_keys(_evaluate_cfg(), "evaluate")
    for experiment in ("toy", "toy_paper", "toy_vllm", "relift_qwen_math_7b"):
        check_top_level_keys(compose_cfg([f"experiment={experiment}"]), "train")


def _evaluate_cfg():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="evaluate", overrides=["paths.output_dir=/tmp/relift-unused"])


def test_per_set_evaluation_settings_must_name_eval_sets(make_cfg):
    from relift_pl.config import ConfigError
    from relift_pl.validation import check_config

    cfg = make_cfg("callbacks.evaluation.k_per_set={levl1:3}")
    with pytest.raises(ConfigError, match=r"callbacks\.evaluation\.k_per_set\.levl1 is not an eval set .*did you mean level1"):
        check_config(cfg, training=True)
    with pytest.raises(ConfigError, match=r"max_problems\.arc is not an eval set"):
        check_config(make_cfg("callbacks.evaluation.max_problems={arc:3}"), training=False)


def test_fp16_training_is_refused(make_cfg):
    from relift_pl.config import ConfigError
    from relift_pl.validation import check_config

    with pytest.raises(ConfigError, match=r"trainer\.precision=16-mixed: fp16 training needs loss scaling"):
        check_config(make_cfg("trainer.precision=16-mixed"), training=True)


def test_a_data_parallel_size_that_misses_ranks_is_refused(make_cfg):
    cfg = make_cfg("trainer=fsdp", "trainer.num_nodes=2", "trainer.strategy.data_parallel_size=2")
    with pytest.raises(ConfigError, match=r"trainer.strategy.data_parallel_size=2 x tensor_parallel_size=1 "
                       r"must equal trainer.num_nodes x trainer.devices = 2 x 2 .*data_parallel_size=null"):
        check_config(cfg, training=True)
    check_config(make_cfg("trainer=fsdp", "trainer.num_nodes=2", "trainer.strategy.data_parallel_size=4"), True)
