"""Generation engines behind one small interface (:class:`RolloutEngine`), by name in :data:`ROLLOUT_ENGINES`."""

from dapo_rl.rollout.base import FINISH_LENGTH, FINISH_STOP, EngineLost, RolloutEngine, Sample, SamplingParams
from dapo_rl.rollout.engines import ROLLOUT_ENGINES, build_engine
from dapo_rl.rollout.hf import HFGenerateEngine, left_pad

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "ROLLOUT_ENGINES", "EngineLost", "HFGenerateEngine", "RolloutEngine", "Sample",
           "SamplingParams", "build_engine", "left_pad"]
