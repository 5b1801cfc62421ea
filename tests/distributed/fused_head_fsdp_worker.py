"""FSDP2 (fully_shard per decoder layer, then the root) on 2 gloo CPU ranks: the fused log-prob head.

Each rank scores its own batch with `policy_logprobs(token_chunk=...)` on the sharded model and
backpropagates; FSDP2 reduce-scatters (averages) the gradients. Checked on every rank:
  fp32: values equal the unsharded full-logits path on the same batch, and the gathered gradients
        equal the average of both ranks' unsharded full-logits gradients (1e-6);
  bf16: with FSDP2's bf16 parameters (fp32 reduce) and gradient checkpointing, as the recipe
        trains, the fused head matches the full-logits path on the same sharded model;
  a no-grad pass (old log-probs) runs in between.
Usage: python fused_head_fsdp_worker.py OUT.json
"""

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import Qwen2Config, Qwen2ForCausalLM

from relift_pl.algorithms import policy_logprobs

WORLD = 2
R = 5  # response width


def _model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).train()  # Qwen2 has no dropout


def _batch(rank: int):
    """[3, 4 + R] ids with left-padded prompts and right-padded responses, different per rank."""
    g = torch.Generator().manual_seed(100 + rank)
    input_ids = torch.randint(1, 96, (3, 4 + R), generator=g)
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    mask[2, -(R - 1 - rank) :] = 0  # ranks differ in length too
    return input_ids, mask


def _loss(model, input_ids, mask, **kwargs):
    logprobs, entropy = policy_logprobs(
        model, input_ids, mask, R, temperature=0.7, with_entropy=True, **kwargs
    )
    real = mask[:, -R:].float()
    loss = (logprobs * real).sum() / real.sum() - 0.3 * (entropy * real).sum() / real.sum()
    return loss, logprobs.detach() * real, entropy.detach() * real


def _shard(model, mp_policy=None):
    mesh = init_device_mesh("cpu", (WORLD,))
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _full_grads(model) -> dict:
    return {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result = {}

    # fp32 reference: both ranks' batches through an unsharded copy, gradients averaged.
    reference = _model()
    for r in range(WORLD):
        loss, lp, ent = _loss(reference, *_batch(r))
        (loss / WORLD).backward()
        if r == rank:
            ref_lp, ref_ent = lp, ent
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}

    sharded = _shard(_model())
    with torch.no_grad():  # an old-log-probs pass first, as the RL update does
        policy_logprobs(sharded, *_batch(rank), R, temperature=0.7, token_chunk=3)
    loss, lp, ent = _loss(sharded, *_batch(rank), token_chunk=3)
    loss.backward()
    result["fp32_value_diff"] = max(
        (lp - ref_lp).abs().max().item(), (ent - ref_ent).abs().max().item()
    )
    result["fp32_grad_diff"] = _max_diff(_full_grads(sharded), ref_grads)
    result["head_restored"] = type(sharded.lm_head).__name__ == "Linear"

    # bf16 parameters (fp32 master and reduce), gradient checkpointing: fused vs full logits.
    bf16 = _model()
    bf16.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _shard(bf16, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    grads, values = [], []
    for token_chunk in (None, 3):
        loss, lp, ent = _loss(bf16, *_batch(rank), token_chunk=token_chunk)
        loss.backward()
        grads.append(_full_grads(bf16))
        values.append((lp, ent))
        bf16.zero_grad(set_to_none=True)
    result["bf16_value_diff"] = max(
        (a - b).abs().max().item() for a, b in zip(*values, strict=True)
    )
    result["bf16_grad_diff"] = _max_diff(*grads)
    result["bf16_grad_scale"] = max(g.float().abs().max().item() for g in grads[0].values())

    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(_worker, args=(free_port, sys.argv[1]), nprocs=WORLD, join=True)
