"""What a training step reports: its rollout statistics, counters and throughput, logged at the
training step (kept out of the module, which reads as the method's five steps)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from relift_pl.distributed import world_size_and_rank
from relift_pl.metrics import StepMetrics
from relift_pl.perf import device_peak_flops, peak_memory_gb, training_flops
from relift_pl.rollout.base import RolloutBatch


def rollout_metrics(
    metrics: StepMetrics, rollout: RolloutBatch, sampled: Tensor, rewards: Tensor, scored
) -> None:
    """``train/*`` over the policy's own samples (``sampled`` [N]; LUFFY mixes demonstrations
    into groups: those go to ``luffy/*``), ``reward/*`` and the generated tokens."""
    if rollout.off_policy is not None:
        demos = rollout.off_policy.float()  # [N]
        metrics.add_mean("luffy/demo_reward_mean", rewards @ demos, demos.sum())
    own = sampled.float()  # [N]
    lengths = rollout.response_lengths.float()  # [N]
    metrics.add_mean("train/reward_mean", rewards @ own, own.sum())
    metrics.add_mean("train/response_length_mean", lengths @ own, own.sum())
    metrics.add_mean("train/truncated_frac", rollout.truncated.float() @ own, own.sum())
    metrics.add("train/response_length_max", lengths[sampled].max(), reduce="max")
    metrics.add("reward/timeouts", float(getattr(scored, "timeouts", 0)))
    metrics.add("reward/failures", float(getattr(scored, "failures", 0)))
    metrics.add("perf/generated_tokens", lengths[sampled].sum())


def step_metrics(
    metrics: StepMetrics, seconds: float, trained_tokens: int, device: torch.device, *,
    buffer_size: int, demos_used: int, demos_available: int, rl_step: int, sft_step: int,
    skipped_steps: int,
) -> None:
    """Counters (the same on every rank), time and memory of the step just finished."""
    for key, value in (
        ("buffer/size", buffer_size),
        ("train/demos_used_frac", demos_used / max(demos_available, 1)),
        ("train/rl_step", rl_step),
        ("train/sft_step", sft_step),
        ("faults/skipped_steps", skipped_steps),
    ):
        metrics.add(key, value, reduce="same")
    metrics.add("perf/step_seconds", seconds, reduce="max")
    metrics.add("perf/trained_tokens", trained_tokens)
    key, value = peak_memory_gb(device)
    metrics.add(key, value, reduce="max")


def throughput(values: dict[str, float], policy: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """The step's throughput figures (``perf/*_per_s``, and ``perf/mfu`` on CUDA) from its reduced
    metrics ``values``."""
    out = {}
    rollout_s = values.get("timing/rollout_s", 0.0)
    if rollout_s and "perf/generated_tokens" in values:
        out["perf/generated_tokens_per_s"] = values["perf/generated_tokens"] / rollout_s
    update_s = values.get("timing/rl_update_s", 0.0) + values.get("timing/sft_s", 0.0)
    if update_s and values.get("perf/trained_tokens"):
        out["perf/trained_tokens_per_s"] = values["perf/trained_tokens"] / update_s
        peak = device_peak_flops(device)
        if peak:  # CUDA only: model FLOPs utilisation of the update phase
            num_params = sum(p.numel() for p in policy.parameters())
            flops = training_flops(num_params, values["perf/trained_tokens"],
                                   getattr(policy, "is_gradient_checkpointing", False))
            out["perf/mfu"] = flops / (update_s * peak * world_size_and_rank()[0])
    return out


def run_totals(totals: dict[str, float], values: dict[str, float]) -> dict[str, float]:
    """The run's totals for its summary after this step: ``timing/*`` summed, ``perf/peak_*``
    maxed."""
    totals = dict(totals)
    for key, value in values.items():
        if key.startswith("timing/"):
            totals[key] = totals.get(key, 0.0) + value
        elif key.startswith("perf/peak_"):
            totals[key] = max(totals.get(key, 0.0), value)
    return totals


def log_step(trainer, values: dict[str, float], step: int, log: Callable[..., None]) -> None:
    """Logs the step's reduced metrics at training step ``step`` (only those it produced); the
    reward and SFT loss also go to the progress bar through ``log`` (the module's ``self.log``)."""
    # Straight to the loggers at the training step: Lightning's self.log would plot against
    # global_step (RL and SFT optimizer steps together) and repeat stale on-step values.
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
    trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})
    for key in ("train/reward_mean", "sft/loss"):
        if key in values:
            log(key.split("/")[-1], values[key], prog_bar=True, logger=False)
