"""Build the rollout engine a configuration names (``rollout.engine``); ``dapo train`` and
``dapo eval`` both sample through it."""

from __future__ import annotations

from dapo_rl.config import Config
from dapo_rl.rollout.base import RolloutEngine


def build_engine(name: str, model, tokenizer, *, max_batch_prompts: int = 64, config: Config | None = None) -> RolloutEngine:
    """``fast`` (our sampler), ``hf`` (Hugging Face ``generate``), ``vllm`` (in-process; needs the vllm extra
    and ``config``) or ``vllm-server`` (a separate vLLM server; needs ``config``, not vLLM in this process).

    Raises:
        ValueError: an unknown name, or vLLM that is not installed (the message says what to install).
    """
    if name == "hf":
        from dapo_rl.rollout.hf import HFGenerateEngine

        return HFGenerateEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                max_batch_prompts=max_batch_prompts)
    if name == "fast":
        from dapo_rl.rollout.fast import FastRolloutEngine

        return FastRolloutEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 max_batch_prompts=max_batch_prompts, keep_decoder=True)
    if name == "vllm":
        try:
            from dapo_rl.rollout.vllm_engine import VLLMEngine  # optional extra
        except ImportError as exc:
            raise ValueError(f"vllm is not available ({' '.join(str(exc).split())[:200]}); install it "
                             f"(see README: vLLM rollouts) or use fast") from None
        if config is None:
            raise ValueError("the vllm engine needs the run's configuration")
        return VLLMEngine.from_config(config, model, tokenizer)
    if name == "vllm-server":
        from dapo_rl.rollout.server_engine import VLLMServerEngine  # standard library + torch only

        if config is None:
            raise ValueError("the vllm-server engine needs the run's configuration")
        return VLLMServerEngine.from_config(config, model, tokenizer)
    raise ValueError(f"unknown rollout engine {name!r}; use fast, hf, vllm or vllm-server")


