"""dapo-rl: reinforcement learning from verifiable rewards with DAPO and the GRPO family.

``from dapo_rl import DAPOTrainer, DAPOConfig`` imports the API on first use (PEP 562), so that
``import dapo_rl`` stays free of torch and the floors stay clean.
"""

__version__ = "0.1.0"
_API = ("DAPOConfig", "DAPOTrainer")


def __getattr__(name: str):
    if name in _API:
        from dapo_rl.api import DAPOConfig, DAPOTrainer

        return {"DAPOConfig": DAPOConfig, "DAPOTrainer": DAPOTrainer}[name]
    raise AttributeError(f"module 'dapo_rl' has no attribute {name!r}")
