"""Lightning callbacks: WHEN side work happens (mining, evaluation, sample logging, weight sync)."""

from callbacks.evaluation import BenchmarkEvaluation
from callbacks.hard_question_mining import HardQuestionMining
from callbacks.preemption import PreemptionCheckpoint
from callbacks.progress import StepProgressBar
from callbacks.sample_logger import SampleCompletionsLogger
from callbacks.vllm_weight_sync import VLLMWeightSync

__all__ = [
    "BenchmarkEvaluation",
    "HardQuestionMining",
    "PreemptionCheckpoint",
    "SampleCompletionsLogger",
    "StepProgressBar",
    "VLLMWeightSync",
]
