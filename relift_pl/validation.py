"""Config checks that run before any model loads (``build()``, for train.py and evaluate.py).

Every failure is a :class:`~relift_pl.config.ConfigError`: one line naming the key and the fix.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from relift_pl.config import AlgorithmConfig, ConfigError
from relift_pl.data.datamodule import check_data_settings
from relift_pl.data.sources import is_missing_local_path
from relift_pl.data.templates import check_chat_template_name
from relift_pl.rollout.base import SamplingParams
from relift_pl.strategies import check_parallel_layout

# Weights kept in these lose AdamW steps below their rounding step (bf16 near 0.02: ~1e-4).
LOW_PRECISION_DTYPES = ("bfloat16", "float16", "half")
LOW_PRECISION_TRAINERS = ("bf16-true", "16-true")


@dataclass
class CheckedConfig:
    """What the checks built on the way (so ``build()`` does not build it twice)."""

    algorithm: AlgorithmConfig
    sampling: SamplingParams


def check_config(cfg: DictConfig, training: bool) -> CheckedConfig:
    """Checks the algorithm, data, rollout and reward settings; ``training`` adds the
    master-weights check (train.py: a run with an optimizer)."""
    if not cfg.max_steps >= 1:
        raise ConfigError(f"max_steps must be >= 1, got {cfg.max_steps}")
    # Before the algorithm: its values may interpolate data's (algorithm.buffer_threshold:
    # ${data.batch_size}), and the error should name the key the user set.
    check_data(cfg.data, training)
    sampling = rollout_sampling(cfg)  # before the algorithm: the PG loss's loss_constant is max_new_tokens
    algorithm = instantiate_checked(cfg.algorithm, "algorithm")
    algorithm.validate()
    check_sft_only_batch(algorithm, cfg.data.batch_size)
    check_reward(cfg.reward)
    check_eval_set_names(cfg)
    check_parallel_layout(cfg.trainer)
    if training:
        check_master_weights(cfg)
        check_loss_scaling(cfg)
    return CheckedConfig(algorithm, sampling)


def check_eval_set_names(cfg: DictConfig) -> None:
    """Per-set evaluation settings must name eval sets: otherwise the first evaluation, possibly
    many training steps in, would be where the typo shows."""
    evaluation = (cfg.get("callbacks") or {}).get("evaluation")
    sets = set((cfg.data.get("eval_sets") or {}).keys())
    for key in ("k_per_set", "max_problems"):
        value = evaluation.get(key) if evaluation is not None else None
        if isinstance(value, DictConfig):
            for name in value:
                if name not in sets:
                    raise ConfigError(unknown_key_message(
                        f"callbacks.evaluation.{key}.{name}", sets, "an eval set (data.eval_sets)"
                    ))  # fmt: skip


def check_loss_scaling(cfg: DictConfig) -> None:
    # 16-mixed scales the loss (GradScaler); the manual optimization here clips the gradients
    # as they are, still scaled, so it is refused rather than silently mis-clipped.
    precision = str(cfg.trainer.get("precision"))
    if precision in ("16-mixed", "16"):
        raise ConfigError(
            f"trainer.precision={precision}: fp16 training needs loss scaling, which relift-pl's "
            "manual optimization does not unscale before clipping; use trainer.precision=bf16-mixed"
        )


def instantiate_checked(node: DictConfig, key: str, **kwargs):
    """``hydra.utils.instantiate`` whose errors become one-line ConfigErrors naming the key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        raise ConfigError(_instantiation_message(err, node, key)) from err


def _instantiation_message(err: InstantiationException, node: DictConfig, key: str) -> str:
    found = re.search(r"full_key: (\S+)", str(err))
    full_key = found.group(1) if found else key
    sub = OmegaConf.select(node, full_key[len(key) + 1 :]) if full_key != key else node
    known = [k for k in sub if not str(k).startswith("_")] if isinstance(sub, DictConfig) else []
    cause = " ".join(str(err.__cause__ or err).split())  # one line
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", cause)
    if unexpected:
        name = unexpected.group(1)
        known = [k for k in known if k != name]
        return unknown_key_message(f"{full_key}.{name}", known, f"a setting of {full_key}")
    if cause.startswith(f"{full_key}."):
        return cause  # already names its key (data.*, callbacks.evaluation.*)
    first_word = cause.split(" ", 1)[0]
    return f"{full_key}.{cause}" if first_word in known else f"{full_key}: {cause}"


def unknown_key_message(key: str, known: Iterable[str], what: str) -> str:
    """``key is not <what>; ...`` with the close matches (difflib), or the known keys."""
    known = sorted(known)
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(known)}."
    return f"{key} is not {what}; {hint} Remove it or fix its spelling."


def check_sft_only_batch(algorithm: AlgorithmConfig, batch_size: int) -> None:
    # SFT-only steps take each batch's demonstrations: M < B drops some, M > B skips steps.
    if not algorithm.rl_enabled and algorithm.sft_enabled and algorithm.buffer_threshold != batch_size:
        raise ConfigError(
            f"algorithm.buffer_threshold (M={algorithm.buffer_threshold}) must equal data.batch_size "
            f"(B={batch_size}) when algorithm.rl_enabled is false (each SFT step takes one batch's "
            "demonstrations): set algorithm.buffer_threshold=${data.batch_size}, as algorithm=sft does"
        )


def rollout_sampling(cfg: DictConfig) -> SamplingParams:
    """The training sampling settings; errors name the ``rollout.sampling`` key."""
    values = OmegaConf.to_container(cfg.rollout.sampling)
    if cfg.algorithm.get("rl_enabled", True) and not values.get("temperature", 1.0) > 0:
        raise ConfigError(
            f"rollout.sampling.temperature must be > 0 for RL rollouts, got {values['temperature']}"
        )
    try:
        return SamplingParams(**values)
    except (TypeError, ValueError) as err:  # SamplingParams says "sampling.<field> must be ..."
        message = str(err)
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", message)
        if unexpected:
            message = unknown_key_message(
                f"rollout.sampling.{unexpected.group(1)}", SamplingParams.__dataclass_fields__,
                "a sampling setting",
            )
            raise ConfigError(message) from err
        raise ConfigError(f"rollout.{message}") from err


def check_data(data: DictConfig, training: bool = True) -> None:
    """The datamodule's own checks, and that local row files exist (before a model loads); the
    training rows only when training (evaluate.py reads the eval sets alone)."""
    names = ("batch_size", "max_prompt_length", "max_demo_length", "overlong_demos")
    check_data_settings(**{name: data[name] for name in names if name in data})
    check_chat_template_name(data.get("chat_template", "model"))
    sources = {"train_rows": data.get("train_rows")} if training else {}
    sources |= {f"eval_sets.{name}": node for name, node in (data.get("eval_sets") or {}).items()}
    for key, node in sources.items():
        path = node.get("path") if isinstance(node, DictConfig) else None
        if path and is_missing_local_path(str(path)):
            raise ConfigError(
                f"data.{key}.path: {path} does not exist; check paths.data_dir (env "
                f"RELIFT_DATA_DIR) or set data.{key}.path"
            )


def check_reward(reward: DictConfig) -> None:
    """Builds the reward once without worker processes: its own checks run at construction."""
    if "num_workers" not in reward:
        return
    factory = instantiate_checked(reward, "reward")
    try:
        # A negative count still reaches the reward's own check; 0 starts no process.
        factory(num_workers=min(int(reward.num_workers), 0)).close()
    except ValueError as err:  # the reward's messages name reward.<key>
        raise ConfigError(str(err)) from err


def check_master_weights(cfg: DictConfig) -> None:
    """Training keeps fp32 weights unless ``model.allow_bf16_master_weights`` says otherwise."""
    if cfg.model.get("allow_bf16_master_weights", False):
        return
    dtype, precision = str(cfg.model.get("dtype")), str(cfg.trainer.get("precision"))
    if dtype in LOW_PRECISION_DTYPES:
        setting = f"model.dtype={dtype}"
    elif precision in LOW_PRECISION_TRAINERS:
        setting = f"trainer.precision={precision}"
    else:
        return
    raise ConfigError(
        f"{setting} keeps the trained weights in 16 bits, where AdamW updates smaller than a "
        "weight's rounding step (lr 1e-6 on bf16 weights) are lost; train with "
        "model.dtype=float32 and trainer.precision=bf16-mixed (16-bit compute, fp32 master "
        "weights), or set model.allow_bf16_master_weights=true to accept the loss"
    )
