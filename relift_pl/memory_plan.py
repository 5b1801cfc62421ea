"""Per-GPU memory of a relift-pl run, phase by phase: what is resident, and how much is left.

Pure arithmetic over two small records: `ModelShape` (the architecture: from a local config.json
or the table of known models, :mod:`relift_pl.model_shape`) and `RunShape` (what the run's config decides: precision, world
size, token budget, optimizers, rollout engine). `plan_memory` returns one `Phase` per phase of a
training step, each a list of `Item`s (name, bytes, formula); `scripts/plan_memory.py` fills
`RunShape` from the composed Hydra config (`run_shape_from_config`) and prints the table.

Phases (per GPU; FSDP2 shards everything persistent over the world size W):
- rollout: the engine generates; training keeps its persistent state meanwhile.
- RL update: forward + backward of one micro-batch at the token budget T, plus persistent state.
- SFT step: the same on demonstrations; an offloaded SFT AdamW returns to the GPU after the
  backward, for its step only (when the activations are gone).

Activation terms (bytes per token; c = compute dtype bytes, h hidden, f intermediate, n query
heads, k key/value heads, d head dim) are derived from what autograd saves in transformers' Qwen2
/ Llama decoder layer (checked against measurement in tests/unit/test_memory_plan.py):
- RMSNorm: float32 input (4h, kept by pow and mul), the normalised value cast back (c h) and
  1 / rms (4); its output is kept by the next projections (c h). Twice per layer.
- attention: q after RoPE (c n d), k and v after RoPE and `repeat_kv` (2 c n d: on CUDA with a
  padding mask transformers repeats grouped KV heads; 2 c k d otherwise), the SDPA output, which
  is also the o_proj input (c n d), its float32 logsumexp (4 n), and the padding mask SDPA made
  additive in the compute dtype (c L for rows of length L). No [L, L] scores (fused kernels).
- MLP (SwiGLU): gate, SiLU(gate), up and their product (4 c f).
With gradient checkpointing only each layer's input (c h) is kept, and one layer's activations
are rebuilt during its backward.

Log-prob path over T tokens and vocabulary V: the full-logits path peaks in its backward at ~5
float32 [T, V] copies whatever the entropy mode (saved logits, logsumexp's backward temporaries,
the gather's gradient and their sum; measured 4.94-4.97), the fused head at ~4 float32
[token_chunk, V] buffers (measured 3.3-3.7) plus its saved [T, h] hidden copy.

Not modelled: allocator fragmentation and CUDA/NCCL context (one `overhead` item), the optimizer
step's temporaries (foreach AdamW works per parameter group of one shard), evaluation passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from relift_pl.config import runs_sft_steps
from relift_pl.model_shape import ModelShape

GiB = 1024**3

# Measured multipliers of the log-prob path (see the module docstring and the tests).
FULL_LOGITS_PEAK_COPIES = 5  # float32 [T, V] copies at the full-logits path's peak
FUSED_CHUNK_PEAK_COPIES = 4  # float32 [token_chunk, V] buffers at the fused head's peak


@dataclass(frozen=True)
class RunShape:
    """What a run's config decides about memory (per GPU unless said otherwise)."""

    world_size: int = 8
    sharded: bool = True  # FSDP2: persistent state sharded over world_size
    master_bytes: int = 4  # dtype of the trained weights and AdamW moments (model.dtype)
    compute_bytes: int = 2  # dtype of FSDP2's all-gathered parameters and activations
    rl_tokens: int = 32768  # tokens of one RL micro-batch (rows x longest row: the budget)
    sft_tokens: int = 32768  # tokens of one SFT micro-batch
    max_sequence: int = 9216  # prompt + response tokens of the longest row
    gradient_checkpointing: bool = True
    token_chunk: int | None = None  # the fused log-prob head's chunk; None: full logits
    rl_enabled: bool = True
    sft_enabled: bool = True  # SFT steps with the SFT AdamW (buffered ones or a warm-up)
    offload_sft_optimizer: bool = False
    reference_policy: bool = False  # KL: a frozen sharded copy of the policy
    defer_grad_sync: bool = False  # FSDP2: unsharded float32 gradients across micro-batches
    repeat_kv: bool = True  # transformers repeats grouped KV heads (CUDA with a padding mask)
    # rollout
    engine: str = "vllm"  # "vllm" or "hf"
    gpu_memory_utilization: float = 0.5
    kv_cache_memory_bytes: int | None = None
    sleep_level: int | None = None
    tensor_parallel: int = 1
    engine_bytes: int = 2  # vLLM's weight dtype
    rollout_sequences: int = 128  # sequences one rank generates at once (B x G / W)
    device_bytes: int = 80 * GiB
    overhead_bytes: int = 2 * GiB  # CUDA context, NCCL buffers, allocator slack (estimate)


@dataclass(frozen=True)
class Item:
    """One resident thing: `bytes` per GPU, and how they were computed."""

    name: str
    bytes: int
    formula: str
    counted: bool = True  # False: shown, but not resident at the phase's peak


@dataclass
class Phase:
    name: str
    items: list[Item] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items if item.counted)

    def add(self, name: str, nbytes: float, formula: str, counted: bool = True) -> None:
        self.items.append(Item(name, int(nbytes), formula, counted))


@dataclass
class MemoryPlan:
    model: ModelShape
    run: RunShape
    phases: list[Phase]

    def margin(self, phase: Phase) -> int:
        return self.run.device_bytes - phase.total


# -- the formulas ---------------------------------------------------------------------------------


def layer_activation_bytes_per_token(
    model: ModelShape, compute_bytes: int, repeat_kv: bool, sequence: int
) -> int:
    """What autograd saves per token in one decoder layer, without checkpointing (see above).

    `sequence` is the padded row length L: SDPA turns the boolean [rows, 1, L, L] padding mask
    into an additive one in the compute dtype and keeps it, c L bytes per token, per layer.
    """
    c, h, f, d = compute_bytes, model.hidden, model.intermediate, model.dim
    q = model.heads * d
    kv = (model.heads if repeat_kv else model.kv_heads) * d
    norm = 4 * h + 4 + c * h  # float32 input, 1 / rms, normalised value in compute dtype
    norms = 2 * (norm + c * h)  # + its output, kept by the next projections
    # q, k, v; the SDPA output, laid out [T, n d], is the o_proj input itself; float32 logsumexp
    attention = c * q + 2 * c * kv + c * q + 4 * model.heads
    return norms + attention + 4 * c * f + c * sequence


def model_extra_bytes_per_token(model: ModelShape, compute_bytes: int) -> int:
    """Saved per token outside the decoder layers: the final RMSNorm (float32 input, 1 / rms,
    normalised value), the LM head's input, RoPE's cos / sin tables and the input ids."""
    c, h = compute_bytes, model.hidden
    return 4 * h + 4 + c * h + c * h + 2 * c * model.dim + 8


def activation_bytes(model: ModelShape, run: RunShape, tokens: int) -> tuple[int, int]:
    """(kept through the forward, rebuilt per layer in backward) for a micro-batch of `tokens`.

    Without checkpointing every layer's activations are kept and nothing is rebuilt.
    """
    per_layer = tokens * layer_activation_bytes_per_token(
        model, run.compute_bytes, run.repeat_kv, run.max_sequence
    )
    if run.gradient_checkpointing:
        return model.layers * run.compute_bytes * model.hidden * tokens, per_layer
    return model.layers * per_layer, 0


def logprob_path_bytes(model: ModelShape, tokens: int, token_chunk: int | None) -> int:
    """Peak of the vocabulary projection + log-prob/entropy for `tokens` predicted tokens (the
    head's saved input is counted with the final norm)."""
    if token_chunk is None:
        return FULL_LOGITS_PEAK_COPIES * 4 * tokens * model.vocab
    return FUSED_CHUNK_PEAK_COPIES * 4 * min(token_chunk, tokens) * model.vocab


def _training_phase(model: ModelShape, run: RunShape, name: str, tokens: int, sft: bool) -> Phase:
    """Persistent state + the working set of one micro-batch's forward and backward."""
    phase = Phase(name)
    shards = run.world_size if run.sharded else 1
    p, m, c = model.params, run.master_bytes, run.compute_bytes
    _persistent(phase, model, run, sft_optimizer_on_gpu=not run.offload_sft_optimizer)
    if sft and run.offload_sft_optimizer:
        # Moved back for its optimizer step only, after the backward has freed the activations.
        phase.add(
            "SFT AdamW moments, at its step", 2 * p * m / shards,
            f"2 x P x {m} B / {shards}: on the GPU after the backward", counted=False,
        )  # fmt: skip
    deferred = run.defer_grad_sync and run.sharded
    if deferred:
        phase.add(
            "unsharded accumulated gradients", p * 4,
            "P x 4 B: deferred gradient sync keeps full float32 gradients across micro-batches",
        )  # fmt: skip
    # Deferred: shards appear as the last micro-batch's reduce-scatters free the full gradients.
    phase.add("gradients (shard)", p * m / shards, f"P x {m} B / {shards}", counted=not deferred)
    if run.sharded:
        phase.add(
            "root params all-gathered (embed, head)", model.root_params * c,
            f"(V h{'' if model.tied_embeddings else ' x 2'} + h) x {c} B: FSDP2 keeps the root "
            "unsharded from forward to backward",
        )  # fmt: skip
        phase.add(
            "decoder layers all-gathered (2)", 2 * model.layer_params * c,
            f"2 x layer params x {c} B (current + prefetched)",
        )  # fmt: skip
        phase.add(
            "unsharded grads in backward",
            model.layer_params * (c + 4) + model.vocab * model.hidden * c,
            f"layer x ({c} + 4) B (gradient + float32 reduce-scatter input) + LM head V h x {c} B",
        )  # fmt: skip
    else:
        phase.add("LM head gradient", model.vocab * model.hidden * m, f"V h x {m} B")
    kept, rebuilt = activation_bytes(model, run, tokens)
    if run.gradient_checkpointing:
        phase.add("checkpointed layer inputs", kept, f"L x T x h x {c} B (T = {tokens})")
    else:
        phase.add("activations (no checkpointing)", kept, "L x T x A B, A = per-token layer saves")
    phase.add(
        "final norm, head input, RoPE, ids", model_extra_bytes_per_token(model, c) * tokens,
        f"T x (4 h + 4 + 2 h x {c} + 2 d x {c} + 8) B",
    )  # fmt: skip
    phase.add(
        "attention mask (bool)", tokens * run.max_sequence,
        f"rows x L^2 x 1 B = T x L (L = {run.max_sequence})",
    )  # fmt: skip
    # The log-prob path peaks before the layers' backward, the rebuilt layer during it.
    logits = logprob_path_bytes(model, tokens, run.token_chunk)
    formula = (
        f"{FULL_LOGITS_PEAK_COPIES} x T x V x 4 B (full float32 logits)"
        if run.token_chunk is None
        else f"{FUSED_CHUNK_PEAK_COPIES} x chunk x V x 4 B (fused head, chunk {run.token_chunk})"
    )
    phase.add("log-prob/entropy path", logits, formula, counted=logits >= rebuilt)
    if run.gradient_checkpointing:
        phase.add(
            "one layer rebuilt in backward", rebuilt, "T x A B (checkpoint recompute)",
            counted=rebuilt > logits,
        )  # fmt: skip
    phase.add("CUDA context, NCCL, fragmentation", run.overhead_bytes, "estimate (--overhead-gb)")
    return phase


def _persistent(phase: Phase, model: ModelShape, run: RunShape, sft_optimizer_on_gpu: bool) -> None:
    """Sharded master weights and optimizer moments (and a KL reference copy)."""
    shards = run.world_size if run.sharded else 1
    p, m = model.params, run.master_bytes
    phase.add("master weights (shard)", p * m / shards, f"P x {m} B / {shards}")
    if run.rl_enabled:
        phase.add("RL AdamW moments (shard)", 2 * p * m / shards, f"2 x P x {m} B / {shards}")
    if run.sft_enabled:
        phase.add(
            "SFT AdamW moments (shard)", 2 * p * m / shards if sft_optimizer_on_gpu else 0,
            f"2 x P x {m} B / {shards}" if sft_optimizer_on_gpu else "offloaded to CPU",
        )  # fmt: skip
    if run.reference_policy:
        phase.add("KL reference policy (shard)", p * m / shards, f"P x {m} B / {shards}")


def _engine_bytes(model: ModelShape, run: RunShape) -> tuple[int, int]:
    """(weights, KV cache + activations) of the vLLM engine on one GPU while awake."""
    weights = model.params * run.engine_bytes // run.tensor_parallel
    if run.kv_cache_memory_bytes is not None:
        return weights, run.kv_cache_memory_bytes
    return weights, max(int(run.gpu_memory_utilization * run.device_bytes) - weights, 0)


def _rollout_phase(model: ModelShape, run: RunShape) -> Phase:
    phase = Phase("rollout")
    _persistent(phase, model, run, sft_optimizer_on_gpu=not run.offload_sft_optimizer)
    if run.engine == "vllm":
        weights, kv = _engine_bytes(model, run)
        phase.add("vLLM weights", weights, f"P x {run.engine_bytes} B / TP {run.tensor_parallel}")
        phase.add(
            "vLLM KV cache + activations", kv,
            f"{run.gpu_memory_utilization} x device - weights"
            if run.kv_cache_memory_bytes is None
            else "kv_cache_memory_bytes",
        )  # fmt: skip
        largest = model.vocab * model.hidden * run.master_bytes
        # With sleep mode the sync runs before the KV cache wakes: not at the peak.
        phase.add(
            "weight sync: one full parameter", largest, f"V h x {run.master_bytes} B",
            counted=not run.sleep_level,
        )  # fmt: skip
    else:  # the policy generates: FSDP2 gathers, KV cache of every sequence at full length
        c = run.compute_bytes
        if run.sharded:
            phase.add(
                "root + 2 layers all-gathered", (model.root_params + 2 * model.layer_params) * c,
                f"(root + 2 layers) x {c} B",
            )  # fmt: skip
        kv = run.rollout_sequences * run.max_sequence * model.kv_cache_bytes_per_token(c)
        phase.add(
            "HF KV cache", kv,
            f"{run.rollout_sequences} seqs x {run.max_sequence} tokens x 2 L k d x {c} B",
        )  # fmt: skip
    phase.add("CUDA context, NCCL, fragmentation", run.overhead_bytes, "estimate (--overhead-gb)")
    return phase


def plan_memory(model: ModelShape, run: RunShape) -> MemoryPlan:
    """The per-GPU memory of each phase of a training step."""
    phases = [_rollout_phase(model, run)]
    asleep = run.engine != "vllm" or run.sleep_level
    training = []
    if run.rl_enabled:
        training.append(_training_phase(model, run, "RL update", run.rl_tokens, sft=False))
    if run.sft_enabled:
        training.append(_training_phase(model, run, "SFT step", run.sft_tokens, sft=True))
    for phase in training:
        if not asleep:  # without sleep mode the engine keeps its memory through training
            weights, kv = _engine_bytes(model, run)
            phase.add("vLLM engine (awake: no sleep mode)", weights + kv, "as in rollout")
    return MemoryPlan(model, run, phases + training)


def with_token_chunk(run: RunShape, token_chunk: int | None) -> RunShape:
    return replace(run, token_chunk=token_chunk)


def notes(plan: MemoryPlan) -> list[str]:
    """What the numbers imply: rollout capacity, and settings that cost memory needlessly."""
    model, run, out = plan.model, plan.run, []
    if run.engine == "vllm":
        weights, kv = _engine_bytes(model, run)
        per_token = model.kv_cache_bytes_per_token(run.engine_bytes) / run.tensor_parallel
        capacity = int(kv / per_token)  # an upper bound: vLLM's activations come out of it too
        need = run.rollout_sequences * run.tensor_parallel * run.max_sequence
        out.append(
            f"vLLM KV cache holds <= {capacity:,} tokens per engine; its "
            f"{run.rollout_sequences * run.tensor_parallel} sequences need {need:,} at full length "
            f"({min(capacity / need, 1):.0%}); vLLM runs fewer at once when they do not fit"
        )
        if run.engine_bytes == 4:
            out.append(
                "vLLM weights are float32 (rollout.engine.dtype follows model.dtype): "
                "rollout.engine.dtype=bfloat16 halves them"
            )
        if not run.sleep_level:
            out.append(
                "no vLLM sleep mode: the engine keeps gpu_memory_utilization x device through "
                "training (rollout.engine.sleep_level=1 frees it)"
            )
    if run.defer_grad_sync and run.sharded:
        out.append(
            f"algorithm.defer_grad_sync keeps {model.params * 4 / GiB:.1f} GiB of unsharded "
            "float32 gradients per GPU while micro-batches accumulate"
        )
    return out


# -- from the composed Hydra config ---------------------------------------------------------------

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "auto": 2}


def _precision_bytes(precision: str) -> int:
    return 4 if str(precision).startswith(("32", "64")) else 2


def run_shape_from_config(cfg, device_gb: float = 80.0, overhead_gb: float = 2.0) -> RunShape:
    """`RunShape` of a composed relift-pl config (`conf/train.yaml` and its groups)."""
    from omegaconf import OmegaConf

    def get(key: str, default=None):
        value = OmegaConf.select(cfg, key, default=default)
        return default if value is None else value

    world = int(get("trainer.devices", 1)) * int(get("trainer.num_nodes", 1))
    strategy = str(get("trainer.strategy._target_", get("trainer.strategy", "")))
    prompt, response = (
        int(get("data.max_prompt_length", 1024)),
        int(get("rollout.sampling.max_new_tokens", 1024)),
    )
    demo = int(get("data.max_demo_length", response))
    budget = get("algorithm.max_tokens_per_micro_batch")
    rl_tokens = int(budget or int(get("algorithm.micro_batch_size", 16)) * (prompt + response))
    sft_tokens = int(budget or int(get("algorithm.sft_micro_batch_size", 16)) * (prompt + demo))
    engine_target = str(get("rollout.engine._target_", ""))
    tp = int(get("rollout.engine.tensor_parallel_size", 1))
    model_dtype = str(get("model.dtype", "float32"))
    return RunShape(
        world_size=world,
        sharded="ModelParallel" in strategy and world > 1,
        master_bytes=_DTYPE_BYTES.get(model_dtype, 4),
        compute_bytes=_precision_bytes(get("trainer.precision", "32-true")),
        rl_tokens=rl_tokens,
        sft_tokens=sft_tokens,
        max_sequence=prompt + max(response, demo),
        gradient_checkpointing=bool(get("model.gradient_checkpointing", False)),
        token_chunk=get("algorithm.logprob_token_chunk"),
        rl_enabled=bool(get("algorithm.rl_enabled", True)),
        sft_enabled=runs_sft_steps(bool(get("algorithm.sft_enabled", True)),
                                   int(get("algorithm.sft_warmup_steps", 0))),
        offload_sft_optimizer=bool(get("algorithm.offload_sft_optimizer", False)),
        reference_policy=float(get("algorithm.pg_loss.kl_coef", 0.0)) > 0,
        defer_grad_sync=bool(get("algorithm.defer_grad_sync", False)),
        engine="vllm" if "VLLM" in engine_target.upper() else "hf",
        gpu_memory_utilization=float(get("rollout.engine.gpu_memory_utilization", 0.5)),
        kv_cache_memory_bytes=get("rollout.engine.kv_cache_memory_bytes"),
        sleep_level=get("rollout.engine.sleep_level") or None,
        tensor_parallel=tp,
        engine_bytes=_DTYPE_BYTES.get(str(get("rollout.engine.dtype", model_dtype)), 2),
        rollout_sequences=int(get("data.batch_size", 1))
        * int(get("algorithm.group_size", 1))
        // max(world, 1),
        device_bytes=int(device_gb * GiB),
        overhead_bytes=int(overhead_gb * GiB),
    )
