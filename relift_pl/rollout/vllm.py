"""Rollouts with vLLM colocated in the training processes (TRL's "colocate", verl's hybrid engine).

This is the only module that imports vllm, and only inside functions: the rest of the package (and
every HF-engine run) works without it. One engine per training rank; each keeps its own copy of the
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
  from (after temperature, and after top-k/top-p when set), which is what the trainer recomputes.
  The default ``raw_logprobs`` ignores the temperature.
- Sleep mode exists only on CUDA/ROCm/XPU: on CPU, ``LLM(enable_sleep_mode=True)`` raises and the
  worker's sleep/wake_up are no-ops, so ``sleep_level`` is rejected there.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from relift_pl.distributed import world_size_and_rank
from relift_pl.rollout.base import (
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    cut_at_eos,
    left_pad,
    right_pad,
)

_KEY = "rollout.engine"  # config prefix quoted in error messages


class SleepCycle:
    """Frees the engine's memory between rollouts, in the only safe order.

    wake weights -> push weights -> wake KV cache -> generate -> sleep. Level 1 offloads the
    weights to host memory and restores them (with the last pushed values) on wake; level 2
    discards them, so a push must come before the next generation. The base checkpoint is never
    reloaded: that would silently undo every push.

    Args:
        llm: the ``vllm.LLM`` (anything with ``sleep(level)`` and ``wake_up(tags)``).
        level: 1 or 2; ``None`` disables sleeping (every method is then a no-op).
    """

    def __init__(self, llm: Any, level: int | None) -> None:
        self.llm = llm
        self.level = level
        self.asleep: set[str] = set()
        self.weights_lost = False

    def sleep(self) -> None:
        """Releases weights and KV cache (after construction and after each generation)."""
        if self.level and not self.asleep:
            self.llm.sleep(level=self.level)
            self.asleep = {"weights", "kv_cache"}
            self.weights_lost = self.level == 2

    def before_push(self) -> None:
        self._wake("weights")

    def after_push(self) -> None:
        self.weights_lost = False

    def before_generate(self) -> None:
        if self.weights_lost:
            raise RuntimeError(
                f"{_KEY}.sleep_level=2 discarded the engine's weights and nothing was pushed since: "
                "a weight-sync callback (callbacks.VLLMWeightSync) must run before each rollout"
            )
        self._wake("weights")
        self._wake("kv_cache")

    def _wake(self, tag: str) -> None:
        if tag in self.asleep:
            self.llm.wake_up(tags=[tag])
            self.asleep.discard(tag)


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
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm = None
        self.cycle: SleepCycle | None = None
        self.eos_ids: list[int] = []
        self.pad_id = 0
        self.synced_version: int | None = None
        """The policy's ``weights_version`` last pushed (set by the sync callback)."""
        self._prefix_cache_stale = False
        self._owns_process_group = False

    # -- construction --------------------------------------------------------------------------
    def bind(self, policy: torch.nn.Module, tokenizer) -> None:
        eos = policy.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.pad_id = tokenizer.pad_token_id
        if self.llm is None:
            model = self.model or getattr(policy, "name_or_path", None)
            if not model:
                raise ValueError(f"{_KEY}.model is unset and the policy has no name_or_path")
            # Without a process group vLLM makes its own (world of 1), which close() may destroy.
            self._owns_process_group = not torch.distributed.is_initialized()
            self.llm = self._build_llm(str(model), policy.config)
            self.cycle = SleepCycle(self.llm, self.sleep_level)
            self.cycle.sleep()  # training runs first: give the memory back now

    def _build_llm(self, model: str, config):
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            _check_cpu_head_dim(config)
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
        backend = self.distributed_executor_backend
        if world > 1:
            # vLLM joins the training process group: one engine per rank, TP groups of
            # consecutive ranks (the torchrun "external launcher" mode).
            os.environ["RANK"] = str(rank)
            os.environ["WORLD_SIZE"] = str(world)
            os.environ.setdefault("LOCAL_RANK", str(rank % max(torch.cuda.device_count(), 1)))
            backend = backend or "external_launcher"
        # Weight pushes pass an iterator of tensors by reference: keep the engine in-process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = dict(
            model=model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            seed=self.seed + rank // self.tensor_parallel_size,
            tensor_parallel_size=self.tensor_parallel_size,
            distributed_executor_backend=backend,
            enable_prefix_caching=self.enable_prefix_caching,
            enable_sleep_mode=bool(self.sleep_level),
            logprobs_mode="processed_logprobs",  # temperature-scaled, like the trainer's
            trust_remote_code=self.trust_remote_code,
        )
        if self.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_memory_bytes)
        return LLM(**(kwargs | self.engine_kwargs))

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
        self.cycle.before_push()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self.cycle.after_push()
        # Cached KV blocks were computed with the old weights; drop them before the next prompt.
        self._prefix_cache_stale = True
        if not self.cycle.asleep:
            self._reset_prefix_cache()

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

        group_prompts, mine = self._gather_tensor_parallel(prompt_ids)
        # A shared per-request seed would give every prompt the same random stream.
        params = [
            self._vllm_sampling(sampling, None if sampling.seed is None else sampling.seed + i)
            for i in range(len(group_prompts))
        ]
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
        tokens, logprobs = [], []
        for request in outputs[mine]:  # same order as the prompts
            for sample in sorted(request.outputs, key=lambda s: s.index):  # prompt-major
                ids = list(sample.token_ids)
                tokens.append(ids)
                logprobs.append(
                    [step[t].logprob for t, step in zip(ids, sample.logprobs, strict=True)]
                )
        return self._to_batch(prompt_ids, tokens, logprobs, sampling.n)

    def _gather_tensor_parallel(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], slice]:
        """The prompts of the whole TP group (its ranks must generate together), and ours in it.

        Each training rank has its own prompts, but the ranks of one tensor-parallel engine run a
        single model: they all submit the group's prompts and keep their own slice of outputs.
        """
        if self.tensor_parallel_size == 1:
            return prompt_ids, slice(None)
        from vllm.distributed import get_tp_group

        group = get_tp_group()
        parts: list[list[list[int]] | None] = [None] * group.world_size
        torch.distributed.all_gather_object(parts, prompt_ids, group=group.cpu_group)
        start = sum(len(part) for part in parts[: group.rank_in_group])
        return [p for part in parts for p in part], slice(start, start + len(prompt_ids))

    def _to_batch(
        self,
        prompt_ids: list[list[int]],
        tokens: list[list[int]],
        logprobs: list[list[float]],
        n: int,
    ) -> RolloutBatch:
        ids, mask = left_pad(prompt_ids, self.pad_id)
        response, _ = right_pad(tokens, self.pad_id)  # [N, R]
        # The same EOS rule as the HF engine: keep the first EOS, mask what follows.
        response, response_mask, reasons = cut_at_eos(response, self.eos_ids, self.pad_id)
        width = response.shape[1]
        sampled_logprobs = torch.zeros((len(tokens), width), dtype=torch.float32)  # [N, R]
        for row, values in enumerate(logprobs):
            sampled_logprobs[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
        sampled_logprobs = sampled_logprobs * response_mask
        return RolloutBatch(
            prompt_ids=ids.repeat_interleave(n, dim=0),
            prompt_mask=mask.repeat_interleave(n, dim=0),
            response_ids=response,
            response_mask=response_mask,
            finish_reasons=reasons,
            logprobs=sampled_logprobs,
        )

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
