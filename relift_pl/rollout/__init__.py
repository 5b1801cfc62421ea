from relift_pl.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from relift_pl.rollout.hf import HFRolloutEngine

__all__ = ["HFRolloutEngine", "RolloutBatch", "RolloutEngine", "SamplingParams"]
