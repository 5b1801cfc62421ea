"""The order of sleep-mode calls around a weight push (no vLLM needed: a recorder stands in).

vLLM's own sleep/wake only run on GPU builds (see tests/vllm/test_vllm_sleep.py); what can be
checked anywhere is that the engine issues them in the one safe order:
wake weights -> push -> wake KV cache -> generate -> sleep.
"""

from __future__ import annotations

import pytest

from relift_pl.rollout.vllm_sleep import SleepCycle


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def sleep(self, level: int) -> None:
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags: list[str]) -> None:
        self.calls.append("wake:" + ",".join(tags))


def _rollout(cycle: SleepCycle, llm: Recorder, push: bool) -> None:
    if push:
        cycle.before_push()
        llm.calls.append("push")
        cycle.after_push()
    cycle.before_generate()
    llm.calls.append("generate")
    cycle.sleep()


@pytest.mark.parametrize("level", [1, 2])
def test_push_happens_between_waking_weights_and_kv_cache(level):
    llm = Recorder()
    cycle = SleepCycle(llm, level)
    cycle.sleep()  # after construction: training comes first
    _rollout(cycle, llm, push=True)
    assert llm.calls == [
        f"sleep{level}",
        "wake:weights",
        "push",
        "wake:kv_cache",
        "generate",
        f"sleep{level}",
    ]


def test_level1_generates_without_a_push_and_level2_refuses():
    llm = Recorder()
    cycle = SleepCycle(llm, 1)
    cycle.sleep()
    _rollout(cycle, llm, push=False)  # offloaded weights come back on wake
    assert llm.calls == ["sleep1", "wake:weights", "wake:kv_cache", "generate", "sleep1"]

    cycle = SleepCycle(Recorder(), 2)
    cycle.sleep()
    assert cycle.weights_lost
    with pytest.raises(RuntimeError, match=r"sleep_level=2 discarded the engine's weights"):
        cycle.before_generate()


def test_no_sleep_level_makes_no_calls():
    llm = Recorder()
    cycle = SleepCycle(llm, None)
    cycle.sleep()
    _rollout(cycle, llm, push=True)
    assert llm.calls == ["push", "generate"]
    assert not cycle.weights_lost


@pytest.mark.parametrize("level", [1, 2])
def test_cached_memory_is_released_before_each_wake_up(level):
    # On CUDA the engine passes torch.cuda.empty_cache: the trainer's freed blocks must go back
    # to the device before vLLM asks for its weights and KV cache again.
    llm = Recorder()
    cycle = SleepCycle(llm, level, release_memory=lambda: llm.calls.append("empty_cache"))
    cycle.sleep()
    _rollout(cycle, llm, push=True)
    assert llm.calls == [
        f"sleep{level}",
        "empty_cache",
        "wake:weights",
        "push",
        "empty_cache",
        "wake:kv_cache",
        "generate",
        f"sleep{level}",
    ]
