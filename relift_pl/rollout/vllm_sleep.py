"""vLLM's sleep mode driven in the one order that keeps a colocated engine's weights right
(:class:`SleepCycle`, used by :class:`relift_pl.rollout.vllm.VLLMRolloutEngine`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class SleepCycle:
    """Frees the engine's memory between rollouts, in the only safe order.

    wake weights -> push weights -> wake KV cache -> generate -> sleep. Level 1 offloads the
    weights to host memory and restores them (with the last pushed values) on wake; level 2
    discards them, so a push must come before the next generation. The base checkpoint is never
    reloaded: that would silently undo every push.

    Args:
        llm: the ``vllm.LLM`` (anything with ``sleep(level)`` and ``wake_up(tags)``).
        level: 1 or 2; ``None`` disables sleeping (every method is then a no-op).
        release_memory: called before each wake-up (``torch.cuda.empty_cache`` on CUDA).
    """

    def __init__(
        self, llm: Any, level: int | None, release_memory: Callable[[], None] | None = None
    ) -> None:
        self.llm = llm
        self.level = level
        self.release_memory = release_memory
        self.asleep: set[str] = set()
        self.weights_lost = False
        self.held = 0  # > 0 inside awake(): several generations in a row (an evaluation)

    @contextmanager
    def awake(self) -> Iterator[None]:
        """Keeps the engine awake across the generations inside (no sleep, no re-push between
        an evaluation's sets); it sleeps once at the end."""
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
            self.sleep()

    def sleep(self) -> None:
        """Releases weights and KV cache (after construction and after each generation)."""
        if self.level and not self.asleep and not self.held:
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
                "rollout.engine.sleep_level=2 discarded the engine's weights and nothing was pushed since: "
                "a weight-sync callback (callbacks.VLLMWeightSync) must run before each rollout"
            )
        self._wake("weights")
        self._wake("kv_cache")

    def _wake(self, tag: str) -> None:
        if tag in self.asleep:
            if self.release_memory is not None:
                # PyTorch's caching allocator keeps the blocks training freed reserved for the
                # trainer; vLLM allocates outside it and would find that memory taken.
                self.release_memory()
            self.llm.wake_up(tags=[tag])
            self.asleep.discard(tag)
