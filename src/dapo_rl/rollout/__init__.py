"""Generation engines behind one small interface."""

from dapo_rl.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutEngine, Sample, SamplingParams
from dapo_rl.rollout.hf import HFGenerateEngine, left_pad

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "HFGenerateEngine", "RolloutEngine", "Sample", "SamplingParams", "left_pad"]
