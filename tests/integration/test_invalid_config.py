"""Bad configuration values fail at startup, before any model loads, each with one line naming
the key and the range."""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from transformers import Qwen2ForCausalLM

import relift_pl.train
from conftest import compose_cfg
from relift_pl.config import ConfigError
from relift_pl.data.sampler import StepBatchSampler
from relift_pl.data.templates import QWEN_THINK_TEMPLATE
from relift_pl.models import load_tokenizer
from relift_pl.toy.base import tiny_qwen2_config
from relift_pl.toy.tokenizer import build_toy_tokenizer
from relift_pl.train import build
from toy_overrides import QUICK_TOY

# (overrides, exception type, the exact one-line message)
BUILD_ERRORS = {
    "G<2": (
        ["algorithm.group_size=1"],
        ConfigError,
        "algorithm.group_size must be >= 2 (GRPO compares samples within a group), got 1",
    ),
    "M<1": (
        ["algorithm.buffer_threshold=0"],
        ConfigError,
        "algorithm.buffer_threshold must be >= 1, got 0",
    ),
    "capacity<M": (
        ["algorithm.buffer_capacity=2"],
        ConfigError,
        "algorithm.buffer_capacity must be >= buffer_threshold (M=4) or null (4 x M), got 2",
    ),
    "sft-schedule": (
        ["algorithm.sft_schedule=sometimes"],
        ConfigError,
        "algorithm.sft_schedule must be one of buffer, every_step, interval, got 'sometimes'",
    ),
    "sft-interval": (
        ["algorithm.sft_interval=0"],
        ConfigError,
        "algorithm.sft_interval must be >= 1, got 0",
    ),
    "sft-warmup-without-rl": (
        ["algorithm=sft", "algorithm.sft_warmup_steps=2"],
        ConfigError,
        "algorithm.sft_warmup_steps must be 0 when rl_enabled is false (the SFT-only run is algorithm=sft), got 2",
    ),
    "sft-loss-coef": (
        ["algorithm=rl_with_sft_loss", "algorithm.sft_loss_coef=-1"],
        ConfigError,
        "algorithm.sft_loss_coef must be >= 0, got -1",
    ),
    "mini-batches": (
        ["algorithm.num_mini_batches=0"],
        ConfigError,
        "algorithm.num_mini_batches must be >= 1, got 0",
    ),
    "micro-batch": (
        ["algorithm.micro_batch_size=0"],
        ConfigError,
        "algorithm.micro_batch_size must be >= 1, got 0",
    ),
    "clip-eps-low": (
        ["algorithm.pg_loss.clip_ratio_low=-0.1"],
        ConfigError,
        "algorithm.pg_loss.clip_ratio_low must be >= 0, got -0.1",
    ),
    "clip-eps-high": (
        ["algorithm.pg_loss.clip_ratio_high=-0.2"],
        ConfigError,
        "algorithm.pg_loss.clip_ratio_high must be >= 0, got -0.2",
    ),
    "max-new-tokens": (
        ["rollout.sampling.max_new_tokens=0"],
        ConfigError,
        "rollout.sampling.max_new_tokens must be >= 1, got 0",
    ),
    "temperature-0": (
        ["rollout.sampling.temperature=0"],
        ConfigError,
        "rollout.sampling.temperature must be > 0 for RL rollouts, got 0",
    ),
    "temperature<0": (
        ["rollout.sampling.temperature=-1"],
        ConfigError,
        "rollout.sampling.temperature must be > 0 for RL rollouts, got -1",
    ),
    "top-p": (
        ["rollout.sampling.top_p=1.5"],
        ConfigError,
        "rollout.sampling.top_p must be in (0, 1], got 1.5",
    ),
    "top-k": (
        ["rollout.sampling.top_k=-1"],
        ConfigError,
        "rollout.sampling.top_k must be >= 0 (0: off), got -1",
    ),
    "min-new-tokens": (
        ["rollout.sampling.min_new_tokens=25"],
        ConfigError,
        "rollout.sampling.min_new_tokens must be in [0, max_new_tokens=24], got 25",
    ),
    "max-prompt-length": (
        ["data.max_prompt_length=0"],
        ConfigError,
        "data.max_prompt_length must be >= 1 (tokens), got 0",
    ),
    "max-demo-length": (
        ["data.max_demo_length=-5"],
        ConfigError,
        "data.max_demo_length must be >= 1 (tokens), got -5",
    ),
    "batch-size": (["data.batch_size=0"], ConfigError, "data.batch_size must be >= 1, got 0"),
    "batch-size<0": (["data.batch_size=-3"], ConfigError, "data.batch_size must be >= 1, got -3"),
    "overlong-demos": (
        ["data.overlong_demos=cut"],
        ConfigError,
        "data.overlong_demos must be 'drop' or 'truncate', got 'cut'",
    ),
    "chat-template": (
        ["data.chat_template=qwen_thinks"],
        ConfigError,
        "data.chat_template='qwen_thinks' is neither one of model, auto, qwen_think nor a Jinja template",
    ),
    "missing-data-file": (
        ["data=math_train", "data.train_rows.path=/nonexistent/train.jsonl"],
        ConfigError,
        "data.train_rows.path: /nonexistent/train.jsonl does not exist; check paths.data_dir "
        "(env RELIFT_DATA_DIR) or set data.train_rows.path",
    ),
    "sft-only-m-not-b": (
        ["algorithm=sft", "algorithm.buffer_threshold=2"],
        ConfigError,
        "algorithm.buffer_threshold (M=2) must equal data.batch_size (B=4) when "
        "algorithm.rl_enabled is false (each SFT step takes one batch's demonstrations): set "
        "algorithm.buffer_threshold=${data.batch_size}, as algorithm=sft does",
    ),
    "reward-timeout": (
        ["reward.timeout_s=0"],
        ConfigError,
        "reward.timeout_s must be > 0 (seconds per item), got 0",
    ),
    "reward-workers": (
        ["reward.num_workers=-1"],
        ConfigError,
        "reward.num_workers must be >= 0 (0: grade in-process), got -1",
    ),
    "reward-mode": (["reward.mode=exact"], ConfigError, "reward.mode must be one of math, choice, integer, auto; got 'exact'"),
    "max-steps": (["max_steps=0"], ConfigError, "max_steps must be >= 1, got 0"),
    "max-consecutive-skips": (
        ["algorithm.max_consecutive_skips=0"],
        ConfigError,
        "algorithm.max_consecutive_skips must be >= 1, got 0",
    ),
    "eval-k": (
        ["callbacks.evaluation.k=0"],
        ConfigError,
        "callbacks.evaluation.k must be >= 1 (samples per problem), got 0",
    ),
    "samples-every": (
        ["callbacks.sample_completions.every_n_steps=-1"],
        ConfigError,
        "callbacks.sample_completions.every_n_steps must be >= 0 (0: off), got -1",
    ),
    "unknown-key-added": (
        ["+algorithm.sft_intervall=1"],
        ConfigError,
        "algorithm.sft_intervall is not a setting of algorithm; did you mean sft_interval? Remove "
        "it or fix its spelling.",
    ),
    "unknown-sampling-key": (
        ["+rollout.sampling.topp=0.5"],
        ConfigError,
        "rollout.sampling.topp is not a sampling setting; did you mean top_p or top_k? Remove it "
        "or fix its spelling.",
    ),
}


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if build() gets as far as building or loading a model or tokenizer."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or loaded before the config was checked")

    for name in ("resolve_model_path", "load_tokenizer", "load_policy"):
        monkeypatch.setattr(relift_pl.train, name, refuse)


@pytest.mark.parametrize("case", list(BUILD_ERRORS))
def test_invalid_value_fails_before_the_model_naming_the_key(case, tmp_path, no_model):
    overrides, error, expected = BUILD_ERRORS[case]
    cfg = compose_cfg([*QUICK_TOY, *overrides], output_dir=tmp_path)
    with pytest.raises(error) as err:
        build(cfg, training=True)
    assert str(err.value) == expected


def test_evaluation_checks_the_eval_files_only(tmp_path, no_model):
    math = [*QUICK_TOY, "data=math_train"]
    # evaluate.py (training=False) never reads the training rows: past the checks, to the model.
    cfg = compose_cfg([*math, "data.train_rows.path=/nonexistent/train.jsonl"], output_dir=tmp_path)
    with pytest.raises(AssertionError, match="a model was built or loaded"):
        build(cfg, training=False)
    cfg = compose_cfg([*math, "data.eval_sets.aime24.path=/nonexistent/aime24.jsonl"], output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        build(cfg, training=False)
    assert str(err.value) == (
        "data.eval_sets.aime24.path: /nonexistent/aime24.jsonl does not exist; check "
        "paths.data_dir (env RELIFT_DATA_DIR) or set data.eval_sets.aime24.path"
    )


@pytest.mark.parametrize(
    "override", ["algorithm.typo=1", "rollout.sampling.tempreature=0.5", "typo=1"]
)
def test_unknown_key_is_rejected_by_the_structured_config(override):
    with pytest.raises(
        ConfigCompositionException,
        match=re.escape(f"Could not override '{override.split('=')[0]}'"),
    ):
        compose_cfg([override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.timeout_s=0", "reward.timeout_s must be > 0 (seconds per item), got 0"),
        ("reward.timeout_s=-1", "reward.timeout_s must be > 0 (seconds per item), got -1"),
        ("reward.num_workers=-1", "reward.num_workers must be >= 0 (0: grade in-process), got -1"),
        (
            "reward.memory_limit_mb=0",
            "reward.memory_limit_mb must be > 0 or null (no limit), got 0",
        ),
        ("reward.mode=exact", "reward.mode must be one of math, choice, integer, auto; got 'exact'"),
    ],
)
def test_invalid_reward_settings(override, message):
    # The reward is built in the module's setup (its workers are processes); it checks first.
    factory = instantiate(compose_cfg([override]).reward)
    with pytest.raises(ValueError) as err:
        factory()
    assert str(err.value) == message


def test_batch_not_divisible_across_ranks(tmp_path):
    with pytest.raises(ValueError) as err:
        StepBatchSampler(num_rows=100, global_batch_size=6, world_size=4)
    assert str(err.value) == "data.batch_size=6 must be divisible by the number of ranks (4)"

    cfg = compose_cfg([*QUICK_TOY, "data.batch_size=6"], output_dir=tmp_path)
    datamodule = instantiate(cfg.data, tokenizer=build_toy_tokenizer())
    datamodule.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ValueError) as err:
        datamodule.setup("fit")
    assert str(err.value) == "data.batch_size=6 must be divisible by the number of ranks (4)"


# -- model directories ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tokenizer = build_toy_tokenizer()
    config = tiny_qwen2_config(
        len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    load_tokenizer(str(path))  # the complete directory loads
    return path


def _without(model_dir, tmp_path, *names: str, drop_template: bool = False):
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    for name in names:
        (path / name).unlink(missing_ok=True)
    if drop_template:
        config = json.loads((path / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_model_dir_without_tokenizer(model_dir, tmp_path):
    path = _without(
        model_dir,
        tmp_path,
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
    )
    cfg = compose_cfg(
        [*QUICK_TOY, "model.build=null", f"model.name_or_path={path}"], output_dir=tmp_path
    )
    with pytest.raises(ValueError) as err:
        build(cfg)
    assert str(err.value).startswith(
        f"'{path}' (model.name_or_path) holds no tokenizer: transformers built an empty one ("
    )


def test_model_dir_without_chat_template(model_dir, tmp_path, caplog):
    # A tokenizer without a template loads: data.chat_template decides whether that is a problem.
    path = _without(model_dir, tmp_path, "chat_template.jinja", drop_template=True)
    overrides = [*QUICK_TOY, "model.build=null", f"model.name_or_path={path}"]
    with pytest.raises(ConfigError) as err:
        build(compose_cfg([*overrides, "data.chat_template=model"], output_dir=tmp_path))
    assert str(err.value) == (
        f"data.chat_template=model but the tokenizer of '{path}' has no chat_template: set "
        "data.chat_template=auto or qwen_think (ChatML opening <think>), or a Jinja string"
    )
    _, _, datamodule = build(compose_cfg([*overrides, "data.chat_template=auto"], output_dir=tmp_path))
    assert datamodule.template == QWEN_THINK_TEMPLATE
    # ChatML is foreign to this tokenizer: said at start, naming the model and the key.
    assert f"data.chat_template=auto: '{path}' has no chat template" in caplog.text
