"""The vLLM engine's config: what ``rollout=vllm`` and ``toy_vllm`` build (no vLLM needed)."""

from __future__ import annotations

import os

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_cfg
from relift_pl.rollout import vllm_settings


def test_engine_dtype_follows_the_checkpoint_but_toy_vllm_stays_float32():
    cfg = compose_cfg(["rollout=vllm", "model=qwen2_5_math_7b"])
    assert cfg.rollout.engine.dtype == "auto"  # Qwen checkpoints are bf16; the trainer keeps fp32
    # vLLM runs a float32 checkpoint's "auto" in bf16: the toy keeps its fp32 engine explicitly.
    toy = compose_cfg(["experiment=toy_vllm"])
    assert instantiate(toy.rollout.engine)().dtype == "float32"


def test_hf_overrides_reach_the_engine_as_plain_dicts():
    cfg = compose_cfg([
        "experiment=toy_vllm",
        "rollout.engine.hf_overrides={max_position_embeddings: 16384, "
        "rope_parameters: {rope_type: default, rope_theta: 40000}}",
    ])  # fmt: skip
    engine = instantiate(cfg.rollout.engine)()
    assert engine.hf_overrides == {
        "max_position_embeddings": 16384,
        "rope_parameters": {"rope_type": "default", "rope_theta": 40000},
    }
    assert type(engine.hf_overrides["rope_parameters"]) is dict  # vLLM tests isinstance(dict)
    assert instantiate(compose_cfg(["experiment=toy_vllm"]).rollout.engine)().hf_overrides is None


def test_vllm_local_rank_is_the_cuda_device_not_the_rank(monkeypatch):
    # Lightning with trainer.devices=[2,3]: ranks 0 and 1 train on GPUs 2 and 3, and vLLM's
    # external-launcher worker uses LOCAL_RANK as its device index.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert vllm_settings.vllm_local_rank("1") == "3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_settings.vllm_local_rank("1") == "1"  # CPU: the launcher's value
    assert vllm_settings.vllm_local_rank(None) == "0"


@pytest.mark.parametrize("before", [None, "1"])
def test_local_rank_is_set_only_while_the_engine_starts(monkeypatch, before):
    # Lightning reads LOCAL_RANK as the process's local rank for the whole run.
    if before is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", before)
    with vllm_settings.environ("LOCAL_RANK", "3"):
        assert os.environ["LOCAL_RANK"] == "3"
    assert os.environ.get("LOCAL_RANK") == before
