"""dapo-rl: reinforcement learning from verifiable rewards with DAPO and the GRPO family."""

__version__ = "0.1.0"
