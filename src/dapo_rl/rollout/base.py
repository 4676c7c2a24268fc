"""The rollout interface: prompts in, G sampled responses per prompt out."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch

if TYPE_CHECKING:
    from dapo_rl.config import Config

FINISH_STOP = "stop"  # ended with EOS or a stop token (the token is part of the response)
FINISH_LENGTH = "length"  # hit max_new_tokens: truncated


@dataclass(frozen=True)
class SamplingParams:
    """How responses are drawn. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS


@dataclass
class TrajectoryStats:
    """What happened in one multi-turn trajectory (:mod:`dapo_rl.rollout.multi_turn`)."""

    turns: int = 0  # model turns
    tool_calls: int = 0
    tool_errors: Counter = field(default_factory=Counter)  # kind (dapo_rl.tools.TOOL_ERROR_KINDS) -> count
    environment_reward: float | None = None  # the environment's reward(), when it has one
    environment_failed: bool = False


@dataclass
class Sample:
    """One generated response: a single turn, or a whole multi-turn trajectory after the prompt.

    ``response_ids`` includes the stop token when ``finish_reason == "stop"``: emitting it is an
    action of the policy and is trained like any other token.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None  # sampler's log-prob of each response token, when the engine gives them (0 on environment tokens)
    # A multi-turn trajectory: 1 on the tokens the model sampled, 0 on the environment's (tool
    # results, observations, the chat template's glue between turns), which are context only: never
    # in the loss, a normaliser, an importance weight or a statistic. None: every response token is
    # the model's (one turn).
    model_mask: list[int] | None = None
    trajectory: TrajectoryStats | None = None  # a multi-turn rollout's account of the trajectory

    @property
    def truncated(self) -> bool:
        return self.finish_reason == FINISH_LENGTH

    @property
    def model_tokens(self) -> int:
        """How many response tokens the model sampled (all of them in one turn)."""
        return len(self.response_ids) if self.model_mask is None else sum(self.model_mask)

    def at_model_tokens(self, values: "torch.Tensor") -> "torch.Tensor":
        """``values[len(response_ids)]`` at the model's tokens only (all of it in one turn)."""
        if self.model_mask is None:
            return values
        return values[torch.tensor(self.model_mask, dtype=torch.bool, device=values.device)]


class EngineLost(RuntimeError):
    """The engine stopped answering (a rollout server that died): the run checkpoints its finished
    steps and stops with the engine's :meth:`RolloutEngine.resume_advice`."""


class RolloutEngine:
    """What the trainer and ``dapo eval`` sample through: prompts in, ``n`` samples per prompt out.

    An engine is a class registered in :data:`dapo_rl.rollout.ROLLOUT_ENGINES` under the name
    ``rollout.engine`` gives (or named by an import path ``pkg.module:Class``). It subclasses this
    class and implements :meth:`from_config`, :meth:`generate` and :meth:`sync_weights`; every
    other capability has a default here that is right for an engine that lacks it, so nothing
    outside ``rollout/`` ever tests an engine's name or probes it with ``hasattr``.

    Class attributes (capabilities the configuration is checked against before anything runs):

    - ``reports_logprobs``: :attr:`Sample.logprobs` is filled (the sampler's π_rollout); the
      rollout correction and the mismatch metrics need it.
    - ``samples_in_background``: :meth:`submit` returns before the samples exist, so the next
      step's first round can be sampled while the trainer updates (``rollout.async_steps=1``).
    - ``own_weights``: the engine samples from its own copy of the weights, in its own kernels
      and precision (vLLM): π_rollout differs from the trainer's π_old beyond rounding, so the
      rollout correction is on by default (``rollout_correction.mode=auto``), and its samples are
      not promised to be bit-identical between runs. In-process engines sample from the
      training model itself.
    - ``probes_precision``: ``from_config`` may time a probe to resolve ``rollout.dtype=auto``
      (and holds no collective of its own), so under torchrun rank 0 builds first and the other
      ranks build with its answer (:func:`dapo_rl.training.compose.rollout_engine`).
    """

    reports_logprobs: ClassVar[bool] = True
    probes_precision: ClassVar[bool] = False
    samples_in_background: ClassVar[bool] = False
    own_weights: ClassVar[bool] = False
    precision_reason: str | None = None  # how an ``auto`` sampling precision was resolved, for the run's log

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Refuse settings this engine cannot honour, before any model is loaded; raises
        :class:`~dapo_rl.config.ConfigError` naming the key. Default: nothing to check."""

    @classmethod
    def from_config(cls, config: Config, model: torch.nn.Module, tokenizer: Any) -> "RolloutEngine":
        """The engine the run's configuration describes, sampling from ``model``."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_config")

    def generate(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        """``n`` samples for each prompt (token ids, no padding); result[i] holds prompt i's samples."""
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights."""
        raise NotImplementedError

    def submit(self, prompts: Sequence[list[int]], n: int, params: SamplingParams, seed: int | None = None) -> Future:
        """``generate`` as a future. Default: sample now and return the finished future (an engine
        with ``samples_in_background`` returns at once). ``seed``: the call's base seed, for engines
        that seed per request; ignored here (sampling draws from torch's generator)."""
        future: Future = Future()
        future.set_result(self.generate(prompts, n, params))
        return future

    @property
    def precision(self) -> str | None:
        """The dtype the engine samples in when it is its own (``"float32"``, ``"bfloat16"``);
        None: the training model's own weights and dtype."""
        return None

    def release_memory(self) -> None:
        """Drop what the engine keeps between calls (rebuilt on the next call). Default: nothing kept."""

    def generate_turns(self, prompts: Sequence[list[int]], n: int, params: SamplingParams,
                       respond: "Callable[[int, list[int]], list[int] | None]", *, wait_steps: int = 0,
                       max_turns: int = 1) -> list[list[Sample]] | None:
        """Whole multi-turn trajectories in one call: when sample ``row`` (counted across prompts,
        prompt i's are ``i·n … i·n + n − 1``) ends a turn with the ids ``turn_ids``,
        ``respond(row, turn_ids)`` returns the message's ids to feed before its next turn, or None
        to end it; the other rows go on sampling meanwhile. ``wait_steps`` > 0: ``respond`` may run
        in a thread, its message fed that many steps after the turn (at most ``max_turns`` waits per
        row). Samples carry ``model_mask``. Default:
        None, the engine cannot (the caller samples turn by turn through :meth:`generate`)."""
        return None

    def continue_conversations(self, enabled: bool) -> None:
        """Multi-turn rollouts switch this on while they run: a call's prompts then extend the
        previous call's prompts + samples, and an engine that can keeps each finished sample's
        keys/values to prefill only the new tokens next time. Default: nothing to keep (each
        prompt is prefilled whole; an engine with prefix caching, vLLM, reuses it anyway)."""

    def describe(self) -> str:
        """What samples, in a few words, for logs and error messages."""
        return f"the {type(self).__name__} rollout engine"

    def resume_advice(self) -> str:
        """What to do after :class:`EngineLost`, in a few words."""
        return "continue with resume=true"

    def close(self) -> None:
        """Free the engine's resources (a server it launched, a KV cache); the last call on it."""


class InProcessEngine(RolloutEngine):
    """Base of the engines that sample from the training model itself, in chunks of prompts.

    Subclasses implement :meth:`_generate_chunk`; chunking bounds the memory of one call.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_id: int, max_batch_prompts: int = 64):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_batch_prompts = max_batch_prompts

    @classmethod
    def from_config(cls, config: Config, model: torch.nn.Module, tokenizer: Any) -> "InProcessEngine":
        return cls(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   max_batch_prompts=config.rollout.max_batch_prompts)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # the same module object: nothing to copy

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        results: list[list[Sample]] = []
        for start in range(0, len(prompts), self.max_batch_prompts):
            results.extend(self._generate_chunk(prompts[start : start + self.max_batch_prompts], n, params))
        return results

    def _generate_chunk(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        raise NotImplementedError
