"""The rollout engines by name (``rollout.engine``): ``dapo train`` and ``dapo eval`` both build
their engine here.

Adding an engine is a module with a :class:`~dapo_rl.rollout.base.RolloutEngine` subclass and
one line below; a user's own engine needs no line at all: ``rollout.engine=pkg.module:Class``
imports it through the same registry.
"""

from __future__ import annotations

from typing import Any

import torch

from dapo_rl.algorithm.registry import Registry
from dapo_rl.config import Config
from dapo_rl.rollout.base import RolloutEngine
from dapo_rl.rollout.decoder_engine import DecoderEngine
from dapo_rl.rollout.hf import HFGenerateEngine
from dapo_rl.rollout.server_engine import VLLMServerEngine
from dapo_rl.rollout.vllm_engine import VLLMEngine


def _engine_class(path: str, obj: Any) -> type[RolloutEngine]:
    """An engine named by import path must be an engine class (checked when it is imported)."""
    if not (isinstance(obj, type) and issubclass(obj, RolloutEngine)):
        raise ValueError(f"{path!r} is not a rollout engine; give a subclass of dapo_rl.rollout.RolloutEngine")
    return obj


ROLLOUT_ENGINES: Registry[type[RolloutEngine]] = Registry("rollout engine", adapt=_engine_class)
ROLLOUT_ENGINES.register("fast", DecoderEngine)  # our sampler: one prefill per prompt, finished rows dropped
ROLLOUT_ENGINES.register("hf", HFGenerateEngine)  # Hugging Face generate on the training model
ROLLOUT_ENGINES.register("vllm", VLLMEngine)  # in-process vLLM (the vllm extra)
ROLLOUT_ENGINES.register("vllm-server", VLLMServerEngine)  # a separate vLLM server (dapo rollout-server)


def build_engine(config: Config, model: torch.nn.Module, tokenizer: Any) -> RolloutEngine:
    """The engine ``config.rollout.engine`` names, sampling from ``model``.

    Raises:
        ValueError: an unknown name, or an import path that is not a rollout engine class.
    """
    return ROLLOUT_ENGINES.get(config.rollout.engine).from_config(config, model, tokenizer)
