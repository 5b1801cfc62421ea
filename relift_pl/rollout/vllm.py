"""Rollouts with vLLM colocated in the training processes (TRL's "colocate", verl's hybrid engine).

This is the only module that imports vllm, and only inside functions: the rest of the package (and
every HF-engine run) works without it. What needs no vllm sits next to it: the sleep-mode order
(``vllm_sleep``), the pushed tensors' format (``vllm_weights``), request seeds and completions
(``vllm_outputs``), settings and environment (``vllm_settings``). One engine per training rank; each keeps its own copy of the
weights, so the policy's parameters are pushed in before each rollout that follows an optimizer step
(``callbacks.VLLMWeightSync``) and the sync is verified by comparing the engine's log-probs of the
sampled tokens with the trainer's (``rollout/logprob_diff_*`` in ``ReLIFTModule``).

Facts this code relies on (vLLM 0.32, CPU and CUDA builds):
- ``collective_rpc("reload_weights", weights_iterator=...)`` loads checkpoint-format (HF-named)
  tensors through the model's own loader and re-runs its post-load processing. Calling
  ``model.load_weights`` directly fails on CPU, where linear weights are repacked after loading.
- The iterator is passed by reference only in-process, so the engine forces
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (``external_launcher`` is in-process too).
- ``logprobs_mode="processed_logprobs"`` returns log-probs of the distribution actually sampled
  from: after temperature (what the trainer recomputes; the default ``raw_logprobs`` ignores it)
  and, when top-k/top-p is set, renormalised over the kept tokens (``TopKTopPSampler``:
  ``log_softmax`` of the masked logits), which the trainer's log-probs are not; likewise before
  ``min_tokens``, whose processor masks the stop tokens first.
- ``dtype="auto"`` is the checkpoint's dtype, except that a float32 checkpoint runs in the
  platform's preferred dtype (bf16; ``_resolve_auto_dtype``).
- A response ends when vLLM says so: ``finish_reason`` is ``"stop"`` (it sampled a stop token,
  which ``token_ids`` keeps) or ``"length"`` (``max_tokens``, or ``max_model_len`` reached
  first, so rows of one batch end at different lengths). ``check_stop`` tests stop tokens first.
- An n > 1 request with ``seed=s`` gives its j-th sample the seed ``s + j``
  (``ParentRequest._get_child_sampling_params``).
- Sleep mode exists only on CUDA/ROCm/XPU: on CPU, ``LLM(enable_sleep_mode=True)`` raises and the
  worker's sleep/wake_up are no-ops, so ``sleep_level`` is rejected there.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from relift_pl.distributed import world_size_and_rank
from relift_pl.quiet import quiet_vllm_weight_reload
from relift_pl.rollout.base import (
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    outside_precision_context,
)
from relift_pl.rollout.vllm_outputs import completions_to_batch, request_seeds
from relift_pl.rollout.vllm_settings import check_hf_overrides, environ, plain, vllm_local_rank
from relift_pl.rollout.vllm_sleep import SleepCycle
from relift_pl.rollout.vllm_weights import (
    check_cpu_moe,
    check_streamable_conversion,
    to_checkpoint_format,
)

_KEY = "rollout.engine"  # config prefix quoted in error messages


class VLLMRolloutEngine(RolloutEngine):
    """Samples with an in-process ``vllm.LLM`` that holds its own copy of the policy's weights.

    Built in ``bind()`` (called from ``ReLIFTModule.setup``, after the process group exists) from
    the model directory or hub id the run trains; afterwards it only ever receives weights through
    :meth:`load_weights`.

    Args:
        model: model directory or hub id to start from; ``None`` takes the policy's
            ``name_or_path`` (the directory the run loaded, e.g. the toy base).
        dtype: engine dtype (``auto`` = the checkpoint's).
        max_model_len: longest prompt + response; ``None`` = the model's context.
        kv_cache_memory_bytes: KV-cache size. Mandatory on CPU (vLLM would otherwise reserve
            most of host memory); on GPU it overrides ``gpu_memory_utilization``.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache).
        enforce_eager: no CUDA graphs / compilation (faster start, less memory).
        seed: engine seed; each data-parallel rank adds its index so ranks sample differently.
            vLLM reseeds the process's global RNG with it.
        sleep_level: 1 or 2 to release the engine's GPU memory between rollouts; ``None`` off.
        tensor_parallel_size: GPUs per engine (they must be consecutive training ranks).
        distributed_executor_backend: ``None`` picks ``external_launcher`` when the world has
            more than one rank (each rank drives its own engine over the existing process group).
        enable_prefix_caching: reuse KV blocks across a prompt's n samples.
        trust_remote_code: passed to vLLM's model loading.
        hf_overrides: changes to the model's Hugging Face config, as ``vllm.LLM(hf_overrides=)``
            (e.g. ``{max_position_embeddings: 16384, rope_parameters: {rope_type: default,
            rope_theta: 40000}}``); the trainer must load the model with the same changes.
        engine_kwargs: any other ``vllm.LLM`` argument (e.g. ``max_num_seqs``).
    """

    needs_weight_sync = True
    returns_logprobs = True

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = True,
        seed: int = 0,
        sleep_level: int | None = None,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        enable_prefix_caching: bool = True,
        trust_remote_code: bool = False,
        hf_overrides: dict[str, Any] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if sleep_level not in (None, 0, 1, 2):
            raise ValueError(f"{_KEY}.sleep_level must be null, 1 or 2, got {sleep_level!r}")
        if kv_cache_memory_bytes is not None and kv_cache_memory_bytes <= 0:
            raise ValueError(
                f"{_KEY}.kv_cache_memory_bytes must be > 0, got {kv_cache_memory_bytes}"
            )
        self.model = model
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.seed = seed
        self.sleep_level = sleep_level or None
        self.tensor_parallel_size = tensor_parallel_size
        self.distributed_executor_backend = distributed_executor_backend
        self.enable_prefix_caching = enable_prefix_caching
        self.trust_remote_code = trust_remote_code
        self.hf_overrides = plain(hf_overrides) or None
        check_hf_overrides(self.hf_overrides)
        self.engine_kwargs = plain(engine_kwargs) or {}
        self.llm = None
        self.cycle: SleepCycle | None = None
        self.eos_ids: list[int] = []
        self.pad_id = 0
        self.synced_version: int | None = None
        """The policy's ``weights_version`` last pushed (set by the sync callback)."""
        self._prefix_cache_stale = False
        self._owns_process_group = False
        self._policy: torch.nn.Module | None = None  # for its checkpoint-format weight names
        self._engine_index, self._num_engines = 0, 1  # data-parallel engines (seed streams)

    # -- construction --------------------------------------------------------------------------
    def bind(self, policy: torch.nn.Module, tokenizer) -> None:
        eos = policy.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.pad_id = tokenizer.pad_token_id
        self._policy = policy
        if self.llm is None:
            model = self.model or getattr(policy, "name_or_path", None)
            if not model:
                raise ValueError(f"{_KEY}.model is unset and the policy has no name_or_path")
            check_streamable_conversion(policy)
            # Without a process group vLLM makes its own (world of 1), which close() may destroy.
            self._owns_process_group = not torch.distributed.is_initialized()
            with outside_precision_context():
                self.llm = self._build_llm(str(model), policy)
            release = torch.cuda.empty_cache if torch.cuda.is_available() else None
            self.cycle = SleepCycle(self.llm, self.sleep_level, release_memory=release)
            self.cycle.sleep()  # training runs first: give the memory back now

    @property
    def engine_dtype(self) -> torch.dtype | None:
        """The dtype the engine computes in (``dtype=auto`` resolved); None before ``bind``."""
        return None if self.llm is None else self.llm.llm_engine.model_config.dtype

    def _build_llm(self, model: str, policy: torch.nn.Module):
        from vllm import LLM
        from vllm.platforms import current_platform

        quiet_vllm_weight_reload()
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            _check_cpu_head_dim(policy.config)
            check_cpu_moe(policy)
        if (
            on_cpu
            and self.kv_cache_memory_bytes is None
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        ):
            raise ValueError(
                f"{_KEY}.kv_cache_memory_bytes is required on CPU (without it vLLM reserves most "
                "of host memory); e.g. 67108864 for the toy model"
            )
        if self.sleep_level and not current_platform.is_sleep_mode_available():
            raise ValueError(
                f"{_KEY}.sleep_level={self.sleep_level}: vLLM has no sleep mode on the "
                f"{current_platform.device_type} platform; set it to null"
            )
        world, rank = world_size_and_rank()
        self._engine_index = rank // self.tensor_parallel_size
        self._num_engines = max(world // self.tensor_parallel_size, 1)
        backend = self.distributed_executor_backend
        local_rank = os.environ.get("LOCAL_RANK")
        if world > 1:
            # vLLM joins the training process group: one engine per rank, TP groups of
            # consecutive ranks (the torchrun "external launcher" mode).
            os.environ["RANK"] = str(rank)
            os.environ["WORLD_SIZE"] = str(world)
            local_rank = vllm_local_rank(local_rank)
            backend = backend or "external_launcher"
        # Weight pushes pass an iterator of tensors by reference: keep the engine in-process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = dict(
            model=model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            seed=self.seed + self._engine_index,
            tensor_parallel_size=self.tensor_parallel_size,
            distributed_executor_backend=backend,
            enable_prefix_caching=self.enable_prefix_caching,
            enable_sleep_mode=bool(self.sleep_level),
            logprobs_mode="processed_logprobs",  # temperature-scaled, like the trainer's
            trust_remote_code=self.trust_remote_code,
        )
        if self.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_memory_bytes)
        if self.hf_overrides:
            kwargs["hf_overrides"] = self.hf_overrides
        # vLLM reads LOCAL_RANK as its device index while it starts; Lightning reads the same
        # variable as the process's local rank for the rest of the run: set it only meanwhile.
        threads = torch.get_num_threads()
        with environ("LOCAL_RANK", local_rank):
            llm = LLM(**(kwargs | self.engine_kwargs))
        # vLLM's GPU worker sets one torch thread for the whole process (unless OMP_NUM_THREADS
        # is set): the trainer's CPU work (the export's casts, data) would run on one core.
        torch.set_num_threads(threads)
        return llm

    # -- weights -------------------------------------------------------------------------------
    @property
    def weights_lost(self) -> bool:
        """True after a level-2 sleep until the next push: the engine has no usable weights."""
        return self.cycle is not None and self.cycle.weights_lost

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Loads full tensors under Hugging Face names, consuming the iterator one tensor at a time."""
        if self.llm is None:
            raise RuntimeError(
                "VLLMRolloutEngine.load_weights called before bind(policy, tokenizer)"
            )
        with outside_precision_context():
            self.cycle.before_push()
            # Transformers 5 holds some weights in another layout than its checkpoints (fused MoE
            # experts); vLLM's loader takes only the checkpoint's names and skips the rest silently.
            weights = to_checkpoint_format(self._policy, named_tensors)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.cycle.after_push()
        # Cached KV blocks were computed with the old weights; drop them before the next prompt.
        self._prefix_cache_stale = True
        if not self.cycle.asleep:
            self._reset_prefix_cache()

    def awake(self):
        """See :meth:`SleepCycle.awake` (a no-op without sleep mode)."""
        return self.cycle.awake() if self.cycle is not None else nullcontext()

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight push")
        self._prefix_cache_stale = False

    # -- generation ----------------------------------------------------------------------------
    def _vllm_sampling(self, sampling: SamplingParams, seed: int | None):
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,  # 0 = greedy
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 = off
            max_tokens=sampling.max_new_tokens,
            min_tokens=sampling.min_new_tokens,
            stop_token_ids=self.eos_ids,
            logprobs=0,  # only the sampled token's log-prob
            detokenize=False,
            seed=seed,
        )

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        if self.llm is None:
            raise RuntimeError("VLLMRolloutEngine.generate called before bind(policy, tokenizer)")
        from vllm.inputs import TokensPrompt

        group_prompts, mine, seed = self._gather_tensor_parallel(prompt_ids, sampling.seed)
        seeds = request_seeds(
            seed, len(group_prompts), sampling.n, self._engine_index, self._num_engines
        )
        params = [self._vllm_sampling(sampling, seed) for seed in seeds]
        with outside_precision_context():
            self.cycle.before_generate()
            if self._prefix_cache_stale:
                self._reset_prefix_cache()
            try:
                outputs = self.llm.generate(
                    [TokensPrompt(prompt_token_ids=list(p)) for p in group_prompts],
                    params,
                    use_tqdm=False,
                )
            finally:
                self.cycle.sleep()
        tokens, logprobs, reasons = [], [], []
        for request in outputs[mine]:  # same order as the prompts
            for sample in sorted(request.outputs, key=lambda s: s.index):  # prompt-major
                ids = list(sample.token_ids)
                tokens.append(ids)
                logprobs.append(
                    [step[t].logprob for t, step in zip(ids, sample.logprobs, strict=True)]
                )
                reasons.append(sample.finish_reason)
        return completions_to_batch(prompt_ids, tokens, logprobs, reasons, sampling.n, self.pad_id)

    def _gather_tensor_parallel(
        self, prompt_ids: list[list[int]], seed: int | None
    ) -> tuple[list[list[int]], slice, int | None]:
        """The prompts of the whole TP group (its ranks must generate together), ours in it, and
        the seed the group samples with.

        Each training rank has its own prompts, but the ranks of one tensor-parallel engine run a
        single model: they all submit the group's prompts and keep their own slice of outputs.
        They must also draw the same random numbers. Unseeded requests draw from each process's
        global RNG, which the module reseeds per rank (seed + rank): the group's ranks would
        sample different tokens into one shared forward pass. So the group always seeds its
        requests, with the first rank's seed (a fresh draw from its RNG when none is given).
        """
        if self.tensor_parallel_size == 1:
            return prompt_ids, slice(None), seed
        from vllm.distributed import get_tp_group

        if seed is None:
            seed = int(torch.randint(0, 2**31, ()).item())
        group = get_tp_group()
        parts: list[tuple[list[list[int]], int] | None] = [None] * group.world_size
        torch.distributed.all_gather_object(parts, (prompt_ids, seed), group=group.cpu_group)
        start = sum(len(part[0]) for part in parts[: group.rank_in_group])
        prompts = [p for part, _ in parts for p in part]
        return prompts, slice(start, start + len(prompt_ids)), parts[0][1]

    def close(self) -> None:
        if self.llm is None:
            return
        if self._owns_process_group:
            self.llm.llm_engine.engine_core.shutdown()
        else:
            _release_keeping_process_group(self.llm)
        self.llm = None
        self.cycle = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


_UNRELEASED: list[Any] = []  # engines kept alive rather than let them end the trainer's group


def _release_keeping_process_group(llm) -> None:
    """Frees an in-process engine that joined the trainer's process group.

    ``EngineCore.shutdown()`` (also run by a finalizer when the engine is garbage collected) ends
    with ``destroy_process_group()`` on the default group, which here is the trainer's: Lightning
    would lose its collectives. So detach that finalizer and shut the executor and scheduler down
    directly; if vLLM's internals moved, keep the engine alive instead (memory over correctness).
    """
    try:
        client = llm.llm_engine.engine_core  # InprocClient
        core = client.engine_core
        client._finalizer.detach()
    except AttributeError:
        _UNRELEASED.append(llm)
        return
    core.model_executor.shutdown()
    if getattr(core, "scheduler", None) is not None:
        core.scheduler.shutdown()
    gc.unfreeze()  # EngineCore.__init__ froze its startup objects


def _check_cpu_head_dim(config) -> None:
    """vLLM's CPU attention kernels take a fixed set of head sizes; fail at setup, not mid-rollout."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # internal path moved: vLLM's own error will do
        return
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (heads and config.hidden_size // heads)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim and head_dim not in supported:
        raise ValueError(
            f"vLLM on CPU supports attention head sizes {supported}; this model has {head_dim} "
            f"(hidden_size {config.hidden_size} / {heads} heads). For the toy base set "
            "model.build.model_overrides (e.g. num_attention_heads=3, num_key_value_heads=1)."
        )
