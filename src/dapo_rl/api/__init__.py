"""The Python API in TRL's shape: ``from dapo_rl import DAPOTrainer, DAPOConfig`` (docs/from-trl.md)."""

from dapo_rl.api.config import DAPOConfig, batch_sizes
from dapo_rl.api.trainer import DAPOTrainer

__all__ = ["DAPOConfig", "DAPOTrainer", "batch_sizes"]
