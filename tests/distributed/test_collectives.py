"""Two gloo processes: metrics reduce the way their meaning needs, and a rank without SFT rows
still takes part in every collective of the SFT step (or the other rank would wait forever)."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.distributed]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, port: int, out_dir: str) -> list[dict]:
    mp.spawn(fn, args=(port, out_dir), nprocs=2, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=60))


def _metrics_worker(rank: int, port: int, out_dir: str) -> None:
    from relift_pl.metrics import StepMetrics

    _init(rank, port)
    metrics = StepMetrics()
    entries = [("loss", rank + 1.0, "sum"), ("reward", float(rank), "mean"),
               ("length_max", 10.0 * rank, "max"), ("grad_norm", 7.0, "same")]
    for key, value, kind in entries if rank == 0 else reversed(entries):  # any order
        metrics.add(key, torch.tensor(value), reduce=kind)
    metrics.add("loss", 0.5)  # accumulates within the step
    # A mean over items that ranks hold in unequal numbers: rank 0 has 1 item (1.0), rank 1 has
    # 3 (0, 0, 1): (1 + 1) / 4, not the mean of the ranks' means (1 + 1/3) / 2.
    metrics.add_mean("reward_mean", *((1.0, 1.0) if rank == 0 else (1.0, 3.0)))
    torch.save(metrics.reduce(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_step_metrics_reduce_by_meaning(tmp_path):
    results = _spawn(_metrics_worker, _free_port(), str(tmp_path))
    # loss: (1 + 0.5) + (2 + 0.5) summed; reward: (0 + 1) / 2; max: 10; same: as held.
    expected = {"loss": 4.0, "reward": 0.5, "length_max": 10.0, "grad_norm": 7.0, "reward_mean": 0.5}
    assert results[0] == results[1] == expected


def _sft_worker(rank: int, port: int, out_dir: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from relift_pl.algorithms import SFTLoss
    from relift_pl.metrics import StepMetrics
    from relift_pl.update import Learner, sft_backward

    _init(rank, port)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    policy = Qwen2ForCausalLM(config)
    algo = SimpleNamespace(sft_micro_batch_size=4, max_tokens_per_micro_batch=None, sft_loss=SFTLoss(),
                           defer_grad_sync=True, logprob_token_chunk=None)
    # One row for two ranks: rank 1 has none and must still join the collectives.
    rows = [{"id": "a", "prompt_ids": [3, 4, 5], "demo_ids": [6, 7, 8, 1]}]
    metrics = StepMetrics()
    sft_backward(Learner(policy), algo, rows, metrics, pad_id=0)
    grad = sum(float(p.grad.abs().sum()) for p in policy.parameters() if p.grad is not None)
    torch.save({"grad": grad, "metrics": metrics.reduce()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_a_rank_without_sft_rows_joins_the_collectives(tmp_path):
    results = _spawn(_sft_worker, _free_port(), str(tmp_path))
    assert results[0]["grad"] > 0  # rank 0 trained on the row
    assert results[1]["grad"] == 0.0  # rank 1 ran its zero-weight filler row
    # The logged loss is the one row's loss, whoever held it (4 demo tokens counted once).
    assert results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["metrics"]["sft/demo_tokens"] == 4.0
    assert results[0]["metrics"]["sft/loss"] > 0


def _fsdp_sampling_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from relift_pl.rollout.base import SamplingParams
    from relift_pl.rollout.hf import HFRolloutEngine

    _init(rank, port)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=1)
    policy = Qwen2ForCausalLM(config)
    for layer in policy.model.layers:
        fully_shard(layer)
    fully_shard(policy)
    # FSDP2's one all-gather entry point (internal: a test may count through it).
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_module

    counted = {"all_gathers": 0}
    original = group_module.foreach_all_gather

    def counting(*args, **kwargs):
        counted["all_gathers"] += 1
        return original(*args, **kwargs)

    group_module.foreach_all_gather = counting
    engine = HFRolloutEngine()
    engine.bind(policy, SimpleNamespace(pad_token_id=0, eos_token_id=1))
    sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, min_new_tokens=12)
    torch.manual_seed(rank)
    batch = engine.generate([[3, 4, 5], [6, 7]], sampling)
    group_module.foreach_all_gather = original
    resharded = all(hasattr(p, "full_tensor") for p in policy.parameters())
    torch.save({"all_gathers": counted["all_gathers"], "tokens": int(batch.response_mask.sum()),
                "resharded": resharded}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_hf_sampling_under_fsdp2_gathers_the_weights_once_per_rollout(tmp_path):
    # 12 decode steps plus a prefill through 3 FSDP units (2 layers and the root): FSDP2's
    # default all-gathers every unit at every forward (39+ collectives); gathered once for the
    # rollout it is one all-gather per unit. The parameters are sharded again afterwards.
    results = _spawn(_fsdp_sampling_worker, _free_port(), str(tmp_path))
    for result in results:
        assert result["tokens"] == 4 * 12
        assert result["all_gathers"] <= 3, result["all_gathers"]
        assert result["resharded"]
